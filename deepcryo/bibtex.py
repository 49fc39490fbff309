# **************************************************************************
# *
# * Authors:     the deepcryo developers
# *
# * This program is free software; you can redistribute it and/or modify
# * it under the terms of the GNU General Public License as published by
# * the Free Software Foundation; either version 3 of the License, or
# * (at your option) any later version.
# *
# * This program is distributed in the hope that it will be useful,
# * but WITHOUT ANY WARRANTY; without even the implied warranty of
# * MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the
# * GNU General Public License for more details.
# *
# * You should have received a copy of the GNU General Public License
# * along with this program.  If not, see <https://www.gnu.org/licenses/>.
# *
# **************************************************************************
"""
@mastersthesis{MarchanTorres2021,
  author = {Marchán Torres, Daniel},
  title = {Deep Learning model to estimate the defocus in Cryogenic Electron Microscopy},
  school = {University of Navarra},
  journal = {Master's thesis, University of Navarra},
  year = {2021},
  note = {Master thesis, carried out at the Biocomputing Unit of the National Center for Biotechnology (CNB-CSIC), Madrid}
}

@phdthesis{Bunzel2022,
  author = {Bunzel, Georg},
  title = {Neural Network Based Methods for the Conformational Landscape Determination in High Resolution Cryo-Electron Microscopy},
  school = {Georg-August-Universität Göttingen},
  journal = {Doctoral thesis, Georg-August-Universität Göttingen},
  year = {2022},
  note = {Doctoral thesis (Dr. rer. nat.), PhD Programme in Computer Science (PCS)}
}

@article{Belkin2003,
  author = {Belkin, Mikhail and Niyogi, Partha},
  title = {Laplacian Eigenmaps for Dimensionality Reduction and Data Representation},
  journal = {Neural Computation},
  volume = {15},
  number = {6},
  pages = {1373--1396},
  year = {2003},
  doi = {https://doi.org/10.1162/089976603321780317}
}

@mastersthesis{Lauzirika2023,
  author = {Lauzirika Zarrabeitia, Oier},
  title = {Development of a fast image alignment algorithm for Cryo-Electron Microscopy},
  school = {Universidad Politécnica de Madrid, ETSI de Telecomunicación},
  journal = {Master's thesis, Universidad Politécnica de Madrid},
  year = {2023},
  note = {Master thesis, supervised by C. O. S. Sorzano (CNB-CSIC) and N. García Santos}
}

@article{Vilas2022,
  author = {Vilas, Jose Luis and Carazo, Jose Maria and Sorzano, Carlos Oscar S.},
  title = {Emerging Themes in CryoEM—Single Particle Analysis Image Processing},
  journal = {Chemical Reviews},
  year = {2022},
  volume = {122},
  number = {17},
  pages = {13915--13951},
  doi = {https://doi.org/10.1021/acs.chemrev.1c00850}
}

@article{Jegou2011,
  author = {Jégou, Hervé and Douze, Matthijs and Schmid, Cordelia},
  title = {Product Quantization for Nearest Neighbor Search},
  journal = {IEEE Transactions on Pattern Analysis and Machine Intelligence},
  year = {2011},
  volume = {33},
  number = {1},
  pages = {117--128},
  doi = {https://doi.org/10.1109/TPAMI.2010.57}
}

@article{Johnson2019,
  author = {Johnson, Jeff and Douze, Matthijs and Jégou, Hervé},
  title = {Billion-scale similarity search with {GPUs}},
  journal = {IEEE Transactions on Big Data},
  year = {2019},
  volume = {7},
  number = {3},
  pages = {535--547},
  doi = {https://doi.org/10.1109/TBDATA.2019.2921572}
}

@article{Douze2024,
  author = {Douze, Matthijs and Guzhva, Alexandr and Deng, Chengqi and Johnson, Jeff and Szilvasy, Gergely and Mazaré, Pierre-Emmanuel and Lomeli, Maria and Hosseini, Lucas and Jégou, Hervé},
  title = {The {Faiss} library},
  journal = {arXiv:2401.08281},
  year = {2024},
  doi = {https://doi.org/10.48550/arXiv.2401.08281}
}

@inproceedings{Ge2013,
  author = {Ge, Tiezheng and He, Kaiming and Ke, Qifa and Sun, Jian},
  title = {Optimized Product Quantization for Approximate Nearest Neighbor Search},
  booktitle = {Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year = {2013},
  pages = {2946--2953},
  url = {https://openaccess.thecvf.com/content_cvpr_2013/html/Ge_Optimized_Product_Quantization_2013_CVPR_paper.html}
}

@article{Scheres2012a,
  author = {Scheres, Sjors H. W.},
  title = {A {Bayesian} View on Cryo-{EM} Structure Determination},
  journal = {Journal of Molecular Biology},
  year = {2012},
  volume = {415},
  number = {2},
  pages = {406--418},
  doi = {https://doi.org/10.1016/j.jmb.2011.11.010}
}

@article{ScheresChen2012,
  author = {Scheres, Sjors H. W. and Chen, Shaoxia},
  title = {Prevention of overfitting in cryo-{EM} structure determination},
  journal = {Nature Methods},
  year = {2012},
  volume = {9},
  pages = {853--854},
  doi = {https://doi.org/10.1038/nmeth.2115}
}

@article{Chen2013,
  author = {Chen, Shaoxia and McMullan, Greg and Faruqi, Abdul R. and Murshudov, Garib N. and Short, Judith M. and Scheres, Sjors H. W. and Henderson, Richard},
  title = {High-resolution noise substitution to measure overfitting and validate resolution in {3D} structure determination by single particle electron cryomicroscopy},
  journal = {Ultramicroscopy},
  year = {2013},
  volume = {135},
  pages = {24--35},
  doi = {https://doi.org/10.1016/j.ultramic.2013.06.004}
}

@article{Zivanov2018,
  author = {Zivanov, Jasenko and Nakane, Takanori and Forsberg, Björn O. and Kimanius, Dari and Hagen, Wim J. H. and Lindahl, Erik and Scheres, Sjors H. W.},
  title = {New tools for automated high-resolution cryo-{EM} structure determination in {RELION-3}},
  journal = {eLife},
  year = {2018},
  volume = {7},
  pages = {e42166},
  doi = {https://doi.org/10.7554/eLife.42166}
}

@article{Nakane2018,
  author = {Nakane, Takanori and Kimanius, Dari and Lindahl, Erik and Scheres, Sjors H. W.},
  title = {Characterisation of molecular motions in cryo-{EM} single-particle data by multi-body refinement in {RELION}},
  journal = {eLife},
  year = {2018},
  volume = {7},
  pages = {e36861},
  doi = {https://doi.org/10.7554/eLife.36861}
}

@inproceedings{Kingma2014,
  author = {Kingma, Diederik P. and Welling, Max},
  title = {Auto-Encoding Variational {Bayes}},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year = {2014},
  eprint = {1312.6114},
  archiveprefix = {arXiv},
  url = {https://arxiv.org/abs/1312.6114}
}

@article{Zhong2021,
  author = {Zhong, Ellen D. and Bepler, Tristan and Berger, Bonnie and Davis, Joseph H.},
  title = {{CryoDRGN}: reconstruction of heterogeneous cryo-{EM} structures using neural networks},
  journal = {Nature Methods},
  year = {2021},
  volume = {18},
  number = {2},
  pages = {176--185},
  doi = {https://doi.org/10.1038/s41592-020-01049-4}
}

@article{delaRosaTrevin2016,
  author = {de la Rosa-Trevín, J. M. and Quintana, A. and del Cano, L. and Zaldívar, A. and Foche, I. and Gutiérrez, J. and Gómez-Blanco, J. and Burguet-Castell, J. and Cuenca-Alba, J. and Abrishami, V. and Vargas, J. and Otón, J. and Sharov, G. and Vilas, J. L. and Navas, J. and Conesa, P. and Kazemi, M. and Marabini, R. and Sorzano, C. O. S. and Carazo, J. M.},
  title = {Scipion: A software framework toward integration, reproducibility and validation in 3D electron microscopy},
  journal = {Journal of Structural Biology},
  year = {2016},
  volume = {195},
  number = {1},
  pages = {93--99},
  doi = {https://doi.org/10.1016/j.jsb.2016.04.010}
}
"""
