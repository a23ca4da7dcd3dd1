"""Every error agdecode reports to people, in one place: all derive from :class:`AgdError`, which the
CLI prints as one line (exit status 2) and the server answers with a 400.

The modules that raise them re-export them (``from agdecode.roi import ROIError`` works).
"""


class AgdError(ValueError):
    """A problem with the user's input or setup, reported as one line."""


class ROIError(AgdError):
    """A region of interest that cannot be resolved against the prompt."""


class MethodError(AgdError):
    """An unknown decoding method, or a method that cannot be registered."""


class MethodUnavailableError(AgdError):
    """An unknown method name or ``generate`` setting."""


class NonFiniteLogitsError(FloatingPointError, AgdError):
    """The model produced NaN or infinite logits."""


class CalibrationError(AgdError):
    """No calibration for this model, or one made for another model."""


class QuantizedWeightsError(AgdError):
    """The model holds packed quantised weights, which the attribution rules cannot read."""


class UnsupportedArchitectureError(AgdError):
    """The model's architecture has no AttnLRP spec."""


class BaselineError(AgdError):
    """A baseline setting that does not fit the model (a layer out of range, a vector for another model)."""


class SteeringVectorMismatch(BaselineError):
    """A steering vector fitted on another model (or another hidden size)."""


class ModelNotFoundError(AgdError, FileNotFoundError):
    """The requested model is not available (not a local file or folder, not cached, not reachable)."""


class ModelLoadError(AgdError):
    """The model files or loading settings are unusable (corrupt file, unknown type, bad dtype or device)."""


class UnsafeModelError(ModelLoadError):
    """The model would run code on loading: its own Python files (``auto_map``) or pickled weights."""


class TraceFileError(AgdError):
    """A trace file that is missing, not JSON, or not a trace written by agdecode."""


class RunMismatchError(AgdError):
    """The run directory holds a run with other settings."""


class RunFileError(AgdError):
    """A run directory whose ``run.json`` or ``records.jsonl`` cannot be read (not written by agdecode, or damaged)."""


class ReportError(AgdError):
    """A report input that cannot be used: no runs, an unknown table marker, an unreadable archive."""


class ItemFileError(AgdError):
    """An item file with malformed lines (refused) or no valid item at all."""


class JudgeError(AgdError):
    """The judge could not be reached, timed out or refused the request."""


class MissingPackageError(AgdError, ImportError):
    """An optional package (IFEval checker, evaluation data, Ray, NLTK's Punkt model) is not installed."""
