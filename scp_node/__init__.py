"""scp-node: a DICOM network inference node that sits next to a PACS."""

__version__ = "0.1.0"
