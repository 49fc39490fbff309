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
  year = {2021},
  note = {Master thesis, carried out at the Biocomputing Unit of the National Center for Biotechnology (CNB-CSIC), Madrid}
}

@phdthesis{Bunzel2022,
  author = {Bunzel, Georg},
  title = {Neural Network Based Methods for the Conformational Landscape Determination in High Resolution Cryo-Electron Microscopy},
  school = {Georg-August-Universität Göttingen},
  year = {2022},
  note = {Doctoral thesis (Dr. rer. nat.), PhD Programme in Computer Science (PCS)}
}

@mastersthesis{Lauzirika2023,
  author = {Lauzirika Zarrabeitia, Oier},
  title = {Development of a fast image alignment algorithm for Cryo-Electron Microscopy},
  school = {Universidad Politécnica de Madrid, ETSI de Telecomunicación},
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
  doi = {10.1021/acs.chemrev.1c00850}
}

@article{Jegou2011,
  author = {Jégou, Hervé and Douze, Matthijs and Schmid, Cordelia},
  title = {Product Quantization for Nearest Neighbor Search},
  journal = {IEEE Transactions on Pattern Analysis and Machine Intelligence},
  year = {2011},
  volume = {33},
  number = {1},
  pages = {117--128},
  doi = {10.1109/TPAMI.2010.57}
}

@article{Johnson2019,
  author = {Johnson, Jeff and Douze, Matthijs and Jégou, Hervé},
  title = {Billion-scale similarity search with {GPUs}},
  journal = {IEEE Transactions on Big Data},
  year = {2019},
  volume = {7},
  number = {3},
  pages = {535--547},
  doi = {10.1109/TBDATA.2019.2921572}
}

@article{delaRosaTrevin2016,
  author = {de la Rosa-Trevín, J. M. and Quintana, A. and del Cano, L. and Zaldívar, A. and Foche, I. and Gutiérrez, J. and Gómez-Blanco, J. and Burguet-Castell, J. and Cuenca-Alba, J. and Abrishami, V. and Vargas, J. and Otón, J. and Sharov, G. and Vilas, J. L. and Navas, J. and Conesa, P. and Kazemi, M. and Marabini, R. and Sorzano, C. O. S. and Carazo, J. M.},
  title = {Scipion: A software framework toward integration, reproducibility and validation in 3D electron microscopy},
  journal = {Journal of Structural Biology},
  year = {2016},
  volume = {195},
  number = {1},
  pages = {93--99},
  doi = {10.1016/j.jsb.2016.04.010}
}
"""
