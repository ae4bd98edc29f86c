"""DICOM series as data: headers, contrast, volumes, reformatting, registration, the derived
series.

Knows pydicom, numpy, scipy and SimpleITK; nothing of the node's state (``pipeline.state``)
or of the models (``pipeline.model``), so a series can be read, classified and written
without a database or torch.
"""
