"""pacsnode: receive DICOM, run AI models, return standard DICOM results to the PACS."""

__version__ = "0.1.0"
