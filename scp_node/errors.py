"""One exception root for the node; driver and library errors are wrapped in these."""

from __future__ import annotations


class NodeError(Exception):
    """Root of every error the node raises on purpose."""


class ConfigError(NodeError):
    """A configuration value is missing or invalid; the message names the key."""


class ModelError(NodeError):
    """A model folder, its card or its weights cannot be used."""


class SeriesError(NodeError):
    """A DICOM series cannot be turned into a volume (inconsistent geometry, missing pixels)."""


class NoMatchingSeriesError(SeriesError):
    """No series of a study satisfies the model's selection rules."""


class SegmentationError(NodeError):
    """A DICOM SEG cannot be built from a label map."""


class DeliveryError(NodeError):
    """A destination could not be reached or refused an instance."""


class SopClassRefusedError(DeliveryError):
    """The destination accepted the association but none of the SOP classes proposed: it
    does not take that kind of object (e.g. SR), and asking again will not change that."""


class JobLeaseLostError(NodeError):
    """The job's lease expired or was taken by another worker; its result must be dropped."""


class JobNotFoundError(NodeError):
    """No job with that id exists."""


class JobStateError(NodeError):
    """The operation is not allowed in the job's current state (the message names the state)."""


class QueueError(NodeError):
    """The job table cannot be read or written (wraps the database driver's error)."""


class BindError(NodeError):
    """A server cannot listen on its address (port in use, or not an address of this host)."""


class OverlayError(NodeError):
    """A burned-in overlay (Secondary Capture) series cannot be built from a label map."""
