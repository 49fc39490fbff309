"""MRC headers as real programs write them (issue #14): the pixel size and data of every file a user meets.

* EPU/Falcon micrographs: mode 6 (uint16), voxel size ``(p, p, 0)``, an FEI1/FEI2 extended header
  (``nsymbt`` > 0) — the two real files of mrcfile's test data (``epu2.9_example.mrc`` 0.6666 Å/px,
  ``fei-extended.mrc`` 0.8538 Å/px, 29-34 MB, not shipped) have exactly these headers;
* every image mode: 0 int8, 1 int16, 2 float32, 6 uint16, 12 float16 and 101 (4-bit, packed by hand
  here: mrcfile does not write it);
* stacks with z = 0, z = x or z = the stack's depth; volumes with cubic and non-cubic voxels;
* bad files: truncated, complex or unknown mode, pixel size missing or inconsistent.

Each file is written here with mrcfile field by field, read back through :func:`deepcryo.core.mrc.read_mrc`
and ``read_mrc_header`` and compared with the values written. ``test_predict_reads_an_epu_header`` runs
``python -m deepcryo.defocus predict`` on a simulated micrograph (known CTF) saved with an EPU header and
no ``--pixel-size``.
"""
import os
import subprocess
import sys

import mrcfile
import numpy as np
import pytest

from deepcryo.core.errors import InputError
from deepcryo.core.micrographs import simulate_micrograph
from deepcryo.core.mrc import ImageStack, read_mrc, read_mrc_header
from deepcryo.core.star import read_star
from deepcryo.defocus import predict

#: mrcfile warns about the damaged and mode-101 files that these tests write on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:mrcfile")

EPU_PX = 0.6666  # Å/px, as EPU writes it (voxel_size = (0.6666, 0.6666, 0))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout
#: bytes per image of the FEI extended header (one block per image, EPU writes 1024 blocks)
FEI_BLOCK = {b"FEI1": 768, b"FEI2": 888}


def _write(path, data, voxel_size, exttyp=None, ispg=None):
    """An MRC file with ``data`` in its own dtype (mrcfile picks the mode), ``voxel_size`` (x, y, z) Å and
    optionally an FEI extended header of 4 blocks (metadata size and version set, the rest zero) and a
    space group."""
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        if exttyp is not None:
            block = np.zeros(FEI_BLOCK[exttyp], np.uint8)
            block[:8] = np.array([FEI_BLOCK[exttyp], 2 if exttyp == b"FEI2" else 0], "<i4").view(np.uint8)
            m.set_extended_header(np.tile(block, 4).view("V1"))
            m.header.exttyp = exttyp
        if ispg is not None:
            m.header.ispg = ispg
        m.voxel_size = voxel_size
    return path


def _write_4bit(path, values, voxel_size):
    """Mode 101: two values per byte, left pixel in the low 4 bits, rows padded to a whole byte."""
    ny, nx = values.shape
    padded = np.zeros((ny, nx + nx % 2), np.uint8)
    padded[:, :nx] = values
    packed = padded[:, 0::2] | (padded[:, 1::2] << 4)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(packed.view(np.int8))
        m.header.mode = 101
        m.header.nx = m.header.mx = nx
        m.voxel_size = voxel_size
    return path


# ------------------------------------------------------------------------------------------ micrographs
@pytest.mark.parametrize("exttyp", [b"FEI1", b"FEI2"])
def test_epu_micrograph_header(tmp_path, exttyp):
    counts = np.random.default_rng(1).integers(0, 65536, (40, 48), dtype=np.uint16)
    path = _write(str(tmp_path / "FoilHole_1_Data_2.mrc"), counts, (EPU_PX, EPU_PX, 0.0), exttyp)
    with mrcfile.open(path) as m:  # the header is the one meant: mode 6, z = 0, an extended header
        assert (int(m.header.mode), float(m.voxel_size.z), m.header.exttyp.tobytes()) == (6, 0.0, exttyp)
        assert int(m.header.nsymbt) == 4 * FEI_BLOCK[exttyp]
    data, px = read_mrc(path)
    assert data.dtype == np.float32 and np.array_equal(data, counts.astype(np.float32))
    assert px == pytest.approx(EPU_PX, rel=1e-6)
    assert read_mrc_header(path) == ((40, 48), pytest.approx(EPU_PX, rel=1e-6))


def test_compressed_micrograph(tmp_path):
    """mrcfile opens .mrc.gz transparently; the size checks must not take the compressed size for the data."""
    counts = np.random.default_rng(3).integers(0, 65536, (32, 40), dtype=np.uint16)
    path = str(tmp_path / "mic.mrc.gz")
    with mrcfile.new(path, compression="gzip") as m:
        m.set_data(counts)
        m.voxel_size = (EPU_PX, EPU_PX, 0.0)
    data, px = read_mrc(path)
    assert np.array_equal(data, counts) and px == pytest.approx(EPU_PX, rel=1e-6)
    assert read_mrc_header(path) == ((32, 40), pytest.approx(EPU_PX, rel=1e-6))


@pytest.mark.parametrize("dtype,mode", [(np.int8, 0), (np.int16, 1), (np.float32, 2), (np.uint16, 6),
                                        (np.float16, 12)])
def test_every_mode_reads_exactly_as_float32(tmp_path, dtype, mode):
    rng = np.random.default_rng(mode)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, (24, 30), dtype=dtype, endpoint=True)
        values[0, :2] = info.min, info.max
    else:
        values = rng.normal(0, 100, (24, 30)).astype(dtype)
    path = _write(str(tmp_path / ("mode%d.mrc" % mode)), values, (1.25, 1.25, 0.0))
    with mrcfile.open(path) as m:
        assert int(m.header.mode) == mode
    data, px = read_mrc(path)
    assert data.dtype == np.float32 and np.array_equal(data, values.astype(np.float32))
    assert px == pytest.approx(1.25)


@pytest.mark.parametrize("flags,signed", [(0, False), (1, True), (None, True)])
def test_imod_mode_0_bytes(tmp_path, flags, signed):
    """IMOD writes mode 0 as unsigned bytes unless bit 1 of imodFlags says signed; without IMOD's stamp
    mode 0 is MRC2014's int8."""
    raw = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = _write(str(tmp_path / "bytes.mrc"), raw.view(np.int8), (2.0, 2.0, 2.0))
    if flags is not None:
        with mrcfile.open(path, mode="r+") as m:
            extra = bytearray(m.header.extra2.tobytes())
            extra[40:48] = np.array([1146047817, flags], "<i4").tobytes()
            m.header.extra2 = bytes(extra)
    expected = (raw.view(np.int8) if signed else raw).astype(np.float32)
    assert np.array_equal(read_mrc(path)[0], expected)
    with ImageStack([(0, path)]) as stack:
        assert np.array_equal(stack.read([0])[0], expected)


@pytest.mark.parametrize("nx", [6, 5])  # odd nx: each row ends with an unused half byte
def test_mode_101_four_bit(tmp_path, nx):
    values = np.random.default_rng(nx).integers(0, 16, (7, nx)).astype(np.uint8)
    path = _write_4bit(str(tmp_path / "frames.mrc"), values, (1.05, 1.05, 0.0))
    with mrcfile.open(path, permissive=True) as m:
        assert int(m.header.mode) == 101 and os.path.getsize(path) == 1024 + 7 * ((nx + 1) // 2)
    data, px = read_mrc(path)
    assert data.dtype == np.float32 and np.array_equal(data, values) and px == pytest.approx(1.05)
    assert read_mrc_header(path)[0] == (7, nx)
    with pytest.raises(InputError, match="4-bit"):
        ImageStack([(0, path)])


# ------------------------------------------------------------------------------------- stacks and volumes
@pytest.mark.parametrize("name,z_A", [("parts.mrcs", 0.0), ("parts.mrc", 0.0), ("parts.mrcs", 1.1),
                                      ("parts.mrcs", 5 * 1.1)])
def test_stack_pixel_size_is_x(tmp_path, name, z_A):
    """Stacks: z = 0 (some programs), z = x (mrcfile's ``voxel_size`` on stacks) or z = depth·x."""
    images = np.random.default_rng(0).normal(size=(5, 16, 16)).astype(np.float32)
    path = _write(str(tmp_path / name), images, (1.1, 1.1, z_A), ispg=0)
    data, px = read_mrc(path)
    assert np.array_equal(data, images) and px == pytest.approx(1.1)
    assert read_mrc_header(path) == ((5, 16, 16), pytest.approx(1.1))
    with ImageStack([(i, path) for i in range(5)]) as stack:
        assert np.array_equal(stack.read(np.arange(5)), images)


def test_volume_voxels(tmp_path):
    vol = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    assert read_mrc(_write(str(tmp_path / "cubic.mrc"), vol, (2.0, 2.0, 2.0), ispg=1))[1] == pytest.approx(2.0)
    # RELION writes its maps with ispg 0; z = 0 is "not recorded"
    assert read_mrc(_write(str(tmp_path / "relion.mrc"), vol, (2.0, 2.0, 2.0), ispg=0))[1] == pytest.approx(2.0)
    assert read_mrc(_write(str(tmp_path / "z0.mrc"), vol, (2.0, 2.0, 0.0), ispg=1))[1] == pytest.approx(2.0)
    for name, voxel, ispg, words in (("flat.mrc", (2.0, 2.0, 3.0), 1, "set its space group ispg to 0"),
                                     ("flat0.mrc", (2.0, 2.0, 3.0), 0, "name it .mrcs"),
                                     ("skew.mrc", (2.0, 2.1, 2.0), 1, "not square")):
        path = _write(str(tmp_path / name), vol, voxel, ispg=ispg)
        for read in (read_mrc, read_mrc_header):
            with pytest.raises(InputError, match=words) as err:
                read(path)
            assert name in str(err.value) and "x=2, y=%g, z=%g" % voxel[1:] in str(err.value)


# ---------------------------------------------------------------------------------------------- bad files
def test_bad_files_have_one_clear_message(tmp_path):
    counts = np.random.default_rng(2).integers(0, 4000, (64, 64), dtype=np.uint16)
    good = _write(str(tmp_path / "good.mrc"), counts, (EPU_PX, EPU_PX, 0.0), b"FEI2")
    with open(good, "rb") as f:
        raw = f.read()
    (tmp_path / "cut.mrc").write_bytes(raw[:len(raw) - 100])
    complex_path = _write(str(tmp_path / "fft.mrc"), np.ones((8, 8), np.complex64), (1.0, 1.0, 1.0))
    mode3 = _write(str(tmp_path / "mode3.mrc"), np.ones((8, 8), np.float32), (1.0, 1.0, 1.0))
    with mrcfile.open(mode3, mode="r+") as m:
        m.header.mode = 3  # complex int16: no numpy dtype, mrcfile leaves the data unread
    four = _write_4bit(str(tmp_path / "four.mrc"), np.ones((8, 8), np.uint8), (1.0, 1.0, 0.0))
    with open(four, "rb") as f:
        raw4 = f.read()
    (tmp_path / "four_cut.mrc").write_bytes(raw4[:-3])
    negative = _write(str(tmp_path / "neg.mrc"), counts, (-1.0, -1.0, 0.0))
    cases = ((str(tmp_path / "cut.mrc"), "truncated: the file holds %d bytes, its header announces %d"
              % (len(raw) - 100, len(raw))),
             (complex_path, "mode 4 is not an image mode deepcryo reads"), (mode3, "mode 3 is not an image mode"),
             (str(tmp_path / "four_cut.mrc"), "truncated"), (negative, "invalid voxel size"))
    for path, words in cases:
        for read in (read_mrc, read_mrc_header):
            with pytest.raises(InputError) as err:
                read(path)
            assert str(err.value).startswith(path + ": ") and words in str(err.value)
            assert len(str(err.value).splitlines()) == 1
    # a header without pixel size is not an error when reading: the caller decides
    assert read_mrc(_write(str(tmp_path / "nopx.mrc"), counts, (0.0, 0.0, 0.0)))[1] == 0.0


# ------------------------------------------------------------------------------------------------ predict
def test_pixel_size_precedence():
    """STAR value, then --pixel-size, then the header; with none, one line that says what to give."""
    acq = dict(voltage_kV=300.0, cs_mm=2.7, amplitude_contrast=0.07)
    cases = ((0.9, None, EPU_PX, 0.9, "STAR"), (None, 1.3, EPU_PX, 1.3, "command line"),
             (None, None, EPU_PX, EPU_PX, "MRC header"))
    for star_px, given_px, header_px, expected, source in cases:
        entry = predict.MicrographEntry("m.mrc", star_px, **acq)
        assert predict._complete(entry, {"pixel_size_A": given_px}, header_px) == source
        assert entry.pixel_size_A == expected
    with pytest.raises(InputError, match="m.mrc: missing pixel size: the MRC header records none"):
        predict._complete(predict.MicrographEntry("m.mrc", **acq), {}, 0.0)


def test_predict_reads_an_epu_header(tmp_path):
    """``python -m deepcryo.defocus predict`` without --pixel-size on a uint16 micrograph with an EPU header
    (z = 0, FEI2 extended header): the pixel size comes from the header and the defocus is the truth's."""
    img, truth = simulate_micrograph(1536, pixel_size_A=EPU_PX, voltage_kV=300.0, cs_mm=2.7, amplitude_contrast=0.07,
                                     defocus_u_A=16000.0, defocus_v_A=15200.0, defocus_angle_deg=40.0, seed=14)
    counts = np.clip(np.rint(img), 0, 65535).astype(np.uint16)  # electron counts, as the camera writes them
    mic = _write(str(tmp_path / "FoilHole_1_Data_2_fractions.mrc"), counts, (EPU_PX, EPU_PX, 0.0), b"FEI2")
    out = str(tmp_path / "ctf.star")
    proc = subprocess.run([sys.executable, "-m", "deepcryo.defocus", "predict", "--micrographs", mic, "--voltage",
                           "300", "--cs", "2.7", "--amplitude-contrast", "0.07", "--output", out, "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr
    assert "pixel size 0.6666 Å/px (MRC header): 1 micrograph" in proc.stdout
    row = {k: v[0] for k, v in read_star(out)["micrographs"].items()}
    assert row["rlnMicrographPixelSize"] == pytest.approx(EPU_PX, rel=1e-5)
    assert abs(row["rlnDefocusU"] - truth["defocus_u_A"]) < 200 and abs(row["rlnDefocusV"] - truth["defocus_v_A"]) < 200
