from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("adapter", "sequences", "residue_probabilities", "crop")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    RESIDUE_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    sequences: _containers.RepeatedScalarFieldContainer[str]
    residue_probabilities: bool
    crop: bool
    def __init__(self, adapter: _Optional[str] = ..., sequences: _Optional[_Iterable[str]] = ..., residue_probabilities: _Optional[bool] = ..., crop: _Optional[bool] = ...) -> None: ...

class ResidueProbabilities(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("labels", "residue_probabilities", "label", "probabilities", "value", "cropped")
    class ProbabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    RESIDUE_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CROPPED_FIELD_NUMBER: _ClassVar[int]
    labels: str
    residue_probabilities: _containers.RepeatedCompositeFieldContainer[ResidueProbabilities]
    label: str
    probabilities: _containers.ScalarMap[str, float]
    value: float
    cropped: bool
    def __init__(self, labels: _Optional[str] = ..., residue_probabilities: _Optional[_Iterable[_Union[ResidueProbabilities, _Mapping]]] = ..., label: _Optional[str] = ..., probabilities: _Optional[_Mapping[str, float]] = ..., value: _Optional[float] = ..., cropped: _Optional[bool] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("adapter", "task", "kind", "label_names", "predictions")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    task: str
    kind: str
    label_names: _containers.RepeatedScalarFieldContainer[str]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    def __init__(self, adapter: _Optional[str] = ..., task: _Optional[str] = ..., kind: _Optional[str] = ..., label_names: _Optional[_Iterable[str]] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("name", "version", "task", "rank", "status", "reason", "mode", "base_fingerprint", "metrics", "kind", "labels")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    task: str
    rank: int
    status: str
    reason: str
    mode: str
    base_fingerprint: str
    metrics: _containers.ScalarMap[str, float]
    kind: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., task: _Optional[str] = ..., rank: _Optional[int] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., mode: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., kind: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "base_fingerprint", "base_name", "registry_problem", "registry_health")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BASE_NAME_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_PROBLEM_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_HEALTH_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    base_fingerprint: str
    base_name: str
    registry_problem: str
    registry_health: RegistryHealth
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ..., base_fingerprint: _Optional[str] = ..., base_name: _Optional[str] = ..., registry_problem: _Optional[str] = ..., registry_health: _Optional[_Union[RegistryHealth, _Mapping]] = ...) -> None: ...

class RegistryHealth(_message.Message):
    __slots__ = ("last_scan_time", "scans", "scan_errors", "last_error", "skipped")
    LAST_SCAN_TIME_FIELD_NUMBER: _ClassVar[int]
    SCANS_FIELD_NUMBER: _ClassVar[int]
    SCAN_ERRORS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    last_scan_time: float
    scans: int
    scan_errors: int
    last_error: str
    skipped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, last_scan_time: _Optional[float] = ..., scans: _Optional[int] = ..., scan_errors: _Optional[int] = ..., last_error: _Optional[str] = ..., skipped: _Optional[_Iterable[str]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("sequences", "per_residue")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    PER_RESIDUE_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedScalarFieldContainer[str]
    per_residue: bool
    def __init__(self, sequences: _Optional[_Iterable[str]] = ..., per_residue: _Optional[bool] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("mean", "residues", "length")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    RESIDUES_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    residues: _containers.RepeatedScalarFieldContainer[float]
    length: int
    def __init__(self, mean: _Optional[_Iterable[float]] = ..., residues: _Optional[_Iterable[float]] = ..., length: _Optional[int] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("dim", "embeddings")
    DIM_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    dim: int
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    def __init__(self, dim: _Optional[int] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ...) -> None: ...

class AnnotateRequest(_message.Message):
    __slots__ = ("adapters", "sequences", "residue_probabilities", "crop")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    RESIDUE_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedScalarFieldContainer[str]
    sequences: _containers.RepeatedScalarFieldContainer[str]
    residue_probabilities: bool
    crop: bool
    def __init__(self, adapters: _Optional[_Iterable[str]] = ..., sequences: _Optional[_Iterable[str]] = ..., residue_probabilities: _Optional[bool] = ..., crop: _Optional[bool] = ...) -> None: ...

class AnnotateResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PredictResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[PredictResponse, _Mapping]]] = ...) -> None: ...
