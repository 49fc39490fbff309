"""End-to-end demo of deepcryo in a headless Scipion project, on simulated data with known truth.

    python -m deepcryo.demo --output-dir demo_out        (what ``bash scripts/demo.sh`` runs)

Steps: simulate a particle set (phantom, CTF, noise) → import it into a Scipion project → reconstruct it with
``DeepCryoProtReconstruct`` (gold-standard half maps) → FSC of the half maps and against the ground truth,
printed as a table and saved as ``fsc.png``; then refine the same particles without their poses from the
truth low-passed to 30 Å with ``DeepCryoProtSwiftRefine`` → resolution and angular error against the true
poses; then simulate micrographs → ``DeepCryoProtDeepDefocus`` →
defocus error against the simulation's truth; then the landscape from estimated poses: simulate a two-state
particle set without poses → ``DeepCryoProtSwiftRefine`` from state 1's map low-passed to 30 Å →
``DeepCryoProtVaeTrain`` → ``DeepCryoProtVaeAnalyze`` (K = 2) → ``DeepCryoProtSwiftRefine`` with one class per
cluster map → ``DeepCryoProtVaeTrain`` → ``DeepCryoProtVaeAnalyze``, with the adjusted Rand index of the clusters
of both passes against the true states. A private Scipion home and the project live under the output folder;
nothing outside it is written.
"""
import argparse
import os
import sys
import time

import numpy as np

from . import scipion_env


def _banner(text):
    print("\n== %s" % text, flush=True)


def _launch(project, prot):
    t0 = time.time()
    project.launchProtocol(prot, wait=True)
    prot = project.getProtocol(prot.getObjId())
    if not prot.isFinished():
        sys.exit("demo: %s failed:\n%s" % (prot.getRunName(), "\n".join(prot.getLogsLastLines(30))))
    print("   %s finished in %.0f s" % (prot.getRunName(), time.time() - t0), flush=True)
    return prot


def run_reconstruction(project, folder, n, box, pixel_size_A, snr):
    """Simulate, import and reconstruct particles; print and plot the FSC; return the resolutions."""
    from pwem.protocols import ProtImportParticles

    from .tests.sets import particleSetFromStar
    from .core import fsc, simulate
    from .core.mrc import read_mrc
    from .protocols import DeepCryoProtReconstruct
    from .viewers.plots import fsc_table, plot_fsc_curves

    _banner("simulating %d particles (%d px, %.2f Å/px, SNR %g, CTF, random poses)" % (n, box, pixel_size_A, snr))
    truth = simulate.phantom_volume(box, seed=1)
    star = simulate.write_particle_set(os.path.join(folder, "particles"), truth, n, pixel_size_A, snr=snr, seed=2)
    parts = particleSetFromStar(star, os.path.join(folder, "particles", "particles.sqlite"))
    parts.close()

    _banner("importing into Scipion and reconstructing with DeepCryoProtReconstruct")
    imp = project.newProtocol(ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_SCIPION,
                              sqliteFile=parts.getFileName(), samplingRate=pixel_size_A, voltage=300.0,
                              sphericalAberration=2.7, amplitudeContrast=0.1, objLabel="import simulated particles")
    imp = _launch(project, imp)
    rec = project.newProtocol(DeepCryoProtReconstruct, numberOfThreads=2, objLabel="deepcryo reconstruct")
    rec.inputParticles.set(imp.outputParticles)
    rec = _launch(project, rec)

    volume = rec.outputVolume
    full, _ = read_mrc(volume.getFileName())
    half1, half2 = (read_mrc(h)[0] for h in volume.getHalfMaps().split(","))
    curves = {"half1 vs half2": fsc.fsc(half1, half2), "map vs truth": fsc.fsc(full, truth)}
    print(fsc_table(curves, pixel_size_A))
    png = os.path.join(folder, "fsc.png")
    plot_fsc_curves(curves, pixel_size_A, png, title="deepcryo reconstruction of %d simulated particles" % n)
    res_half = fsc.fsc_resolution_A(curves["half1 vs half2"], pixel_size_A, 0.143)
    res_truth = fsc.fsc_resolution_A(curves["map vs truth"], pixel_size_A, 0.5)
    print("resolution: half maps (FSC 0.143) %.2f Å; against the truth (FSC 0.5) %.2f Å; plot: %s"
          % (res_half, res_truth, png))
    return {"import": imp, "truth": truth, "star": star, "res_half": res_half, "res_truth": res_truth}


def run_refinement(project, folder, imported, pixel_size_A, initial_resolution_A=30.0):
    """Refine the imported particles with DeepCryoProtSwiftRefine from the truth low-passed to
    ``initial_resolution_A``; print the resolution and the angular error against the simulation's poses."""
    import torch
    from pwem.protocols import ProtImportVolumes

    from .convert import fscResolution, posesFromMatrices
    from .core import fourier, fsc, geometry
    from .core.mrc import read_mrc, write_mrc
    from .core.particles import read_particles
    from .protocols import DeepCryoProtSwiftRefine

    _banner("3D refinement with DeepCryoProtSwiftRefine (poses unknown; initial map: truth low-passed to %g Å)"
            % initial_resolution_A)
    ref_dir = os.path.join(folder, "initial_map")
    os.makedirs(ref_dir, exist_ok=True)
    write_mrc(os.path.join(ref_dir, "initial.mrc"), fourier.lowpass_volume(
        torch.as_tensor(imported["truth"]), initial_resolution_A, pixel_size_A).numpy(), pixel_size_A)
    vol = project.newProtocol(ProtImportVolumes, filesPath=ref_dir, filesPattern="initial.mrc",
                              samplingRate=pixel_size_A, objLabel="import initial map")
    vol = _launch(project, vol)
    ref = project.newProtocol(DeepCryoProtSwiftRefine, initialResolution=initial_resolution_A, numberOfThreads=2,
                              objLabel="deepcryo swiftrefine")
    ref.inputParticles.set(imported["import"].outputParticles)
    ref.inputVolumes.append(vol.outputVolume)
    ref = _launch(project, ref)
    truth = read_particles(imported["star"], require_images=False).angles_deg()
    # iterItems reuses one object: read each particle's values while it is current
    rows, matrices = zip(*[(p.getIndex() - 1, p.getTransform().getMatrix())
                           for p in ref.outputParticles.iterItems(orderBy="id")])
    angles, _ = posesFromMatrices(np.stack(matrices))
    rows = np.array(rows)
    err = geometry.pose_distance_deg(torch.as_tensor(truth[rows]), torch.as_tensor(np.asarray(angles))).numpy()
    final, _ = read_mrc(ref.outputVolume.getFileName())
    res_truth = fsc.fsc_resolution_A(fsc.fsc(final, imported["truth"]), pixel_size_A, 0.5)
    print("\n".join(ref.summary()))
    print("swiftrefine: half maps (FSC 0.143, masked, corrected) %.2f Å; against the truth (FSC 0.5) %.2f Å; median angular "
          "error against the true poses %.2f° (%.1f%% above 10°)"
          % (fscResolution(ref.outputFSC, pixel_size_A), res_truth, np.median(err), 100 * np.mean(err > 10)))
    return float(np.median(err)), res_truth


def run_defocus(project, folder, n, size_px):
    """Simulate micrographs, estimate their CTF with DeepCryoProtDeepDefocus, print the error vs truth."""
    from pwem.protocols import ProtImportMicrographs

    from .core import micrographs
    from .protocols import DeepCryoProtDeepDefocus

    _banner("simulating %d micrographs (%d px) with known defocus" % (n, size_px))
    mic_dir = os.path.join(folder, "micrographs")
    _, truths = micrographs.simulate_micrograph_set(n, mic_dir, size_px=size_px, seed=3,
                                                    pixel_size_range_A=(1.0, 1.0), voltages_kV=(300.0,),
                                                    defocus_range_A=(8000.0, 30000.0))
    imp = project.newProtocol(ProtImportMicrographs, filesPath=mic_dir, filesPattern="*.mrc", samplingRate=1.0,
                              voltage=300.0, sphericalAberration=2.7, amplitudeContrast=0.07,
                              objLabel="import simulated micrographs")
    imp = _launch(project, imp)
    _banner("estimating defocus with DeepCryoProtDeepDefocus (CNN + physics refinement)")
    prot = project.newProtocol(DeepCryoProtDeepDefocus, objLabel="deepcryo deep defocus")
    prot.inputMicrographs.set(imp.outputMicrographs)
    prot = _launch(project, prot)
    truth = {"mic_%04d.mrc" % i: t for i, t in enumerate(truths)}  # simulate_micrograph_set's names
    errors = []
    for ctf in prot.outputCTF:
        t = truth[os.path.basename(ctf.getMicrograph().getFileName())]
        errors += [abs(ctf.getDefocusU() - t["defocus_u_A"]), abs(ctf.getDefocusV() - t["defocus_v_A"])]
    mae = float(np.mean(errors))
    print("defocus MAE against the simulation's truth (U and V, %d micrographs): %.0f Å" % (n, mae))
    return mae


def _clusters_ari(analyze, states):
    """Adjusted Rand index of an analysis' clusters against the true state of each particle (by image index)."""
    from sklearn.metrics import adjusted_rand_score

    found, true = [], []
    for cls in analyze.outputClasses:
        for p in cls.iterItems():
            found.append(cls.getObjId())
            true.append(states[p.getIndex() - 1])
    return adjusted_rand_score(true, found)


def _landscape_pass(project, refine, epochs, working_box, states, label):
    """Train the landscape VAE on the particles refined by ``refine``, analyse it with K = 2; returns the analysis
    and its ARI against the true states."""
    from .protocols import DeepCryoProtVaeAnalyze, DeepCryoProtVaeTrain

    train = project.newProtocol(DeepCryoProtVaeTrain, latentDim=8, workingBox=working_box, epochs=epochs,
                                useGpu=False, numberOfThreads=2, objLabel="deepcryo VAE train, %s" % label)
    train.inputParticles.set(refine.outputParticles)
    train = _launch(project, train)
    analyze = project.newProtocol(DeepCryoProtVaeAnalyze, numberOfClusters=2, numberOfThreads=2,
                                  objLabel="deepcryo VAE analyze, %s" % label)
    analyze.trainRun.set(train)
    analyze = _launch(project, analyze)
    ari = _clusters_ari(analyze, states)
    print("landscape VAE, %s: %d clusters of %s particles; adjusted Rand index against the true states: %.3f "
          "(1 = perfect, 0 = chance); plots in %s"
          % (label, len(analyze.outputClasses), [c.getSize() for c in analyze.outputClasses], ari,
             analyze._getExtraPath("analysis")), flush=True)
    return analyze, ari


def run_landscape(project, folder, n, box, pixel_size_A, snr, epochs, initial_resolution_A=30.0):
    """The user's landscape path from particles without poses: simulate a two-state set, refine it with
    DeepCryoProtSwiftRefine from state 1's map, train and analyse the VAE (K = 2); then refine again with one class
    per cluster map of that analysis and train and analyse the VAE on those poses. Prints the ARI of both passes
    against the true states and returns them."""
    import torch
    from pwem.protocols import ProtImportParticles, ProtImportVolumes
    from pyworkflow.object import Pointer

    from .tests.sets import particleSetFromStar
    from .core import fourier, simulate
    from .core.mrc import write_mrc
    from .core.particles import read_particles
    from .protocols import DeepCryoProtSwiftRefine

    _banner("simulating %d particles of two conformations (50/50, %d px, SNR %g) for the landscape VAE"
            % (n, box, snr))
    data_dir = os.path.join(folder, "two_states")
    maps = simulate.phantom_states(box, 2, seed=0)
    states = np.random.default_rng(4).permutation(np.arange(n) % 2)
    star = simulate.write_particle_set(data_dir, maps, n, pixel_size_A, snr=snr, seed=4, state_of=states)
    truth = np.asarray(read_particles(star).particles["rlnClassNumber"], dtype=np.int64)
    parts = particleSetFromStar(star, os.path.join(data_dir, "particles.sqlite"), withAlignment=False)
    parts.close()
    write_mrc(os.path.join(data_dir, "state1_initial.mrc"), fourier.lowpass_volume(
        torch.as_tensor(maps[0]), initial_resolution_A, pixel_size_A).numpy(), pixel_size_A)
    imp = project.newProtocol(ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_SCIPION,
                              sqliteFile=parts.getFileName(), samplingRate=pixel_size_A, voltage=300.0,
                              sphericalAberration=2.7, amplitudeContrast=0.1,
                              objLabel="import two-state particles (no poses)")
    imp = _launch(project, imp)
    vol = project.newProtocol(ProtImportVolumes, filesPath=data_dir, filesPattern="state1_initial.mrc",
                              samplingRate=pixel_size_A, objLabel="import state 1 low-passed")
    vol = _launch(project, vol)

    def refine(volumes, resolution_A, label):
        prot = project.newProtocol(DeepCryoProtSwiftRefine, initialResolution=resolution_A, numberOfThreads=2,
                                   objLabel="deepcryo swiftrefine, %s" % label)
        prot.inputParticles.set(imp.outputParticles)
        for v in volumes:
            prot.inputVolumes.append(v)
        return _launch(project, prot)

    _banner("landscape from estimated poses, pass 1: DeepCryoProtSwiftRefine from state 1's map low-passed to "
            "%g Å → DeepCryoProtVaeTrain (%d epochs, working box %d) → DeepCryoProtVaeAnalyze (K = 2)"
            % (initial_resolution_A, epochs, box // 2))
    consensus = refine([Pointer(vol.outputVolume)], initial_resolution_A, "one map")
    first, ari_one = _landscape_pass(project, consensus, epochs, box // 2, truth, "one pass")
    _banner("pass 2: DeepCryoProtSwiftRefine with one class per cluster map of pass 1 (15 Å) → VAE → analysis")
    classes = refine([Pointer(first, extended="outputVolumes.%d" % v.getObjId()) for v in first.outputVolumes],
                     15.0, "cluster maps")
    _, ari_two = _landscape_pass(project, classes, epochs, box // 2, truth, "two passes")
    print("landscape from estimated poses: ARI one pass %.3f, two passes %.3f" % (ari_one, ari_two))
    return ari_one, ari_two


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m deepcryo.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="demo_out")
    p.add_argument("--particles", type=int, default=3000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--pixel-size", type=float, default=2.0)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--micrographs", type=int, default=6)
    p.add_argument("--micrograph-size", type=int, default=2048)
    p.add_argument("--landscape-particles", type=int, default=1000,
                   help="particles of the two-state set (refined twice, the landscape trained twice)")
    p.add_argument("--vae-epochs", type=int, default=8)
    args = p.parse_args(argv)
    folder = os.path.abspath(args.output_dir)
    os.makedirs(folder, exist_ok=True)
    scipion_env.setup(os.path.join(folder, "scipion"))
    from pyworkflow.project import Manager

    name = "deepcryo_demo_%s" % time.strftime("%Y%m%d_%H%M%S")
    project = Manager().createProject(name)
    os.chdir(project.getPath())          # pyworkflow launches protocols relative to the project folder
    print("Scipion project: %s" % project.getPath())
    imported = run_reconstruction(project, folder, args.particles, args.box, args.pixel_size, args.snr)
    run_refinement(project, folder, imported, args.pixel_size)
    run_defocus(project, folder, args.micrographs, args.micrograph_size)
    run_landscape(project, folder, args.landscape_particles, args.box, args.pixel_size, args.snr, args.vae_epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
