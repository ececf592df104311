"""Everything that speaks DICOM beyond reading scans: the result SR (sr.py writes it,
sr_content.py builds its content, codes.py holds its codes, sr_read.py reads it back), the C-STORE
node, its config and journal, DICOMweb.

The rest of the library sees a folder of files in and prediction rows out; highdicom, pynetdicom
and dicomweb-client are imported only here, by the submodules (importing this package loads none).
"""
