"""Pickles read without running them: torch.save's state dicts, and the Lightning and Hydra objects around them.

torch.load(weights_only=True) refuses any global it does not know, so a checkpoint whose hyper_parameters hold an
omegaconf DictConfig, an argparse.Namespace, a pathlib.Path or a numpy scalar is refused whole, though its tensors
are plain. This unpickler reads such a file and runs nothing from it: `find_class` never imports the module a
pickle names and never hands back anything the pickle names, except

- torch's tensor rebuilders (torch._utils._rebuild_tensor_v2 and friends) and storage types, recognised by name
  and answered with bnprobe's own functions, which record where a tensor's bytes are (StoredTensor), not read;
- the standard containers (OrderedDict, set, frozenset, dict, list, tuple, torch.Size as a tuple) and the bytes
  that protocol 2 writes through `_codecs.encode`;

and every other global becomes a Stand: an inert stand-in class, made here, whose calls, `__setstate__` (BUILD),
appends and item assignments only record their arguments. `os.system`, `eval`, `builtins.getattr`,
`subprocess.Popen` or a class's `__setstate__` named in a pickle are stand-ins like any other: nothing is called.

Bounds: the pickle's size (MAX_PICKLE_BYTES, read before unpickling), the number of stand-ins (MAX_STANDS), and
a storage's declared size, checked by the archive reader against the bytes the file holds for it.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from bnprobe.core.errors import BnprobeError

# A state dict's pickle takes ~200 bytes a tensor (100,000 tensors in 20 MB); unpickled objects take at most a few
# tens of times their bytes, so this bounds the memory a hostile pickle can make to ~2 GB.
MAX_PICKLE_BYTES = 64 << 20
MAX_STANDS = 1_000_000
MAX_DIMS = 64  # of a tensor: torch's own limit is 64 too
MAX_ELEMENTS = 1 << 62  # of a tensor or storage, whatever it declares: checked against the file's bytes later

# torch's storage types (torch.FloatStorage, ...) and dtypes (torch.float32, ...) by name: dtype names as
# torch prints them, without the "torch." prefix.
STORAGE_DTYPES = {"DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
                  "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
                  "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
                  "UntypedStorage": "uint8", "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128"}
DTYPE_NAMES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
               "complex64", "complex128", "double", "float", "half", "long", "int", "short"}
DTYPE_ALIASES = {"double": "float64", "float": "float32", "half": "float16", "long": "int64", "int": "int32",
                 "short": "int16"}
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
            "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16}


@dataclass
class Storage:
    """A torch storage as the pickle names it: its key (the archive's data/KEY), dtype and element count."""

    key: str
    dtype: str
    numel: int
    location: str
    start: int = -1  # where its bytes begin in the file, once the file's reader found them
    byteorder: str = "little"


@dataclass
class StoredTensor:
    """A tensor as the pickle declares it: where its elements are in a storage, nothing read. `unreadable` says why
    a tensor has no bytes bnprobe can read (sparse, meta, quantized, ...); `read` is set by the file's reader."""

    storage: Optional[Storage]
    offset: int  # in elements of dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    unreadable: str = ""
    read: Optional[Callable[[], Any]] = field(default=None, repr=False)  # () -> numpy array

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Stand:
    """An object of a class the pickle names, never imported: what it was built with, kept inert. `made` counts
    the stand-ins of one pickle (shared by its classes), to bound them."""

    module = ""
    qualname = ""
    made: list = [0]

    def __new__(cls, *args: Any, **kwargs: Any) -> "Stand":
        cls.made[0] += 1
        if cls.made[0] > MAX_STANDS:
            raise BnprobeError(f"the pickle builds more than {MAX_STANDS:,} objects of foreign classes")
        instance = super().__new__(cls)
        instance.args, instance.kwargs, instance.state, instance.items, instance.entries = args, kwargs, None, [], {}
        return instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # __new__ recorded the arguments

    def __call__(self, *args: Any, **kwargs: Any) -> "Stand":
        """A stand-in called (getattr(x, "system")(...) in a pickle): another stand-in, the call recorded."""
        return type(self).__new__(type(self), *args, **kwargs)

    def __setstate__(self, state: Any) -> None:  # BUILD: recorded, never a class's own __setstate__
        self.state = state

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.entries[key] = value

    def __repr__(self) -> str:
        return f"<{self.module}.{self.qualname}, not run>"

    def contents(self) -> list:
        """What the stand-in holds, for a walk over the loaded object."""
        return [*self.args, *self.kwargs.values(), self.state, *self.items, *self.entries.values()]


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """How protocol 2 pickles bytes: _codecs.encode(str, 'latin1'); the text codecs alone."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise BnprobeError("a pickle asks _codecs.encode for something other than text to bytes")
    return text.encode(encoding)


def _size(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_ELEMENTS for v in value):
        raise BnprobeError(f"a tensor's {what} is not a list of at most {MAX_DIMS} whole numbers >= 0")
    return tuple(value)


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: Optional[str] = None) -> StoredTensor:
    if not isinstance(storage, Storage):
        raise BnprobeError("a tensor in the pickle is not built on a storage of the file")
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= MAX_ELEMENTS:
        raise BnprobeError("a tensor's storage offset is not a whole number >= 0")
    shape, strides = _size(size, "size"), _size(stride, "stride")
    if len(shape) != len(strides):
        raise BnprobeError("a tensor's size and stride differ in length")
    return StoredTensor(storage, offset, shape, strides, dtype or storage.dtype)


def _dtype(value: Any) -> str:
    if isinstance(value, DtypeName):
        return str(value)
    raise BnprobeError("a tensor's dtype is not one of torch's")


class DtypeName(str):
    """torch.float32 and friends, named in a pickle: the name alone."""


def _unreadable(kind: str) -> Callable[..., StoredTensor]:
    def rebuild(*args: Any, **kwargs: Any) -> StoredTensor:
        return StoredTensor(None, 0, (), (), "", unreadable=kind)
    return rebuild


def _sparse(layout: Any, *args: Any) -> StoredTensor:
    kind = layout if isinstance(layout, str) else getattr(layout, "qualname", "")
    return StoredTensor(None, 0, (), (), "", unreadable=kind.removeprefix("torch.")[:40] or "sparse")


def _layout(name: Any) -> str:
    return str(name)[:40]  # torch._utils._get_layout("torch.sparse_coo"): the name alone


def _meta(dtype: Any, size: Any, *args: Any) -> StoredTensor:
    return StoredTensor(None, 0, _size(size, "size"), (), _dtype(dtype), unreadable="meta, no data")


def _parameter(data: Any, *args: Any) -> Any:
    return data  # an nn.Parameter is its tensor here


REBUILDERS: dict[str, Callable[..., Any]] = {
    "_rebuild_tensor": lambda storage, offset, size, stride: _tensor(storage, offset, size, stride),
    "_rebuild_tensor_v2": lambda storage, offset, size, stride, *rest: _tensor(storage, offset, size, stride),
    "_rebuild_tensor_v3": lambda storage, offset, size, stride, grad, hooks, dtype, *rest: _tensor(
        storage, offset, size, stride, _dtype(dtype)),
    "_rebuild_parameter": _parameter,
    "_rebuild_parameter_with_state": _parameter,
    "_rebuild_sparse_tensor": _sparse,
    "_rebuild_sparse_csr_tensor": _sparse,
    "_rebuild_meta_tensor_no_storage": _meta,
    "_rebuild_qtensor": _unreadable("quantized"),
    "_rebuild_wrapper_subclass": _unreadable("a tensor subclass"),
    "_rebuild_nested_tensor": _unreadable("nested"),
    "_rebuild_device_tensor_from_numpy": _unreadable("built from numpy"),
    "_rebuild_device_tensor_from_cpu_tensor": _unreadable("built on another device"),
}
CONTAINERS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict, ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset, ("builtins", "dict"): dict, ("builtins", "list"): list,
    ("builtins", "tuple"): tuple, ("torch", "Size"): tuple, ("_codecs", "encode"): _codecs_encode,
    ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset,  # protocol 2 of Python 2
}


class InertUnpickler(pickle.Unpickler):
    """See the module. `storage` receives each storage a persistent id names (torch's ('storage', type, key,
    location, numel[, view])) and returns it once it has checked it against the file."""

    def __init__(self, file: Any, storage: Callable[[Storage], Storage]) -> None:
        super().__init__(file, encoding="latin1")
        self._storage = storage
        self._classes: dict[tuple[str, str], type] = {}
        self._made = [0]

    def find_class(self, module: str, name: str) -> Any:  # never imports, never returns what the pickle names
        if (module, name) in CONTAINERS:
            return CONTAINERS[module, name]
        if module == "torch._utils" and name in REBUILDERS:
            return REBUILDERS[name]
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _layout
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(STORAGE_DTYPES[name])
        if module == "torch" and name in DTYPE_NAMES:
            return DtypeName(DTYPE_ALIASES.get(name, name))
        return self._stand(module, name)

    def _stand(self, module: str, name: str) -> type:
        key = (str(module)[:200], str(name)[:200])
        if key not in self._classes:
            if len(self._classes) >= MAX_STANDS:
                raise BnprobeError(f"the pickle names more than {MAX_STANDS:,} foreign classes")
            self._classes[key] = type(key[1].rpartition(".")[2] or "Stand", (Stand,),
                                      {"module": key[0], "qualname": key[1], "made": self._made})
        return self._classes[key]

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise BnprobeError(f"the pickle refers to an object outside it that is not a torch storage "
                               f"({type(pid).__name__})")
        _, kind, key, location, numel = pid[:5]
        if not isinstance(kind, StorageType):
            raise BnprobeError("a storage of the pickle has no torch storage type")
        if not isinstance(numel, int) or isinstance(numel, bool) or not 0 <= numel <= MAX_ELEMENTS:
            raise BnprobeError("a storage's size is not a whole number >= 0")
        if len(pid) > 5 and pid[5] is not None:
            raise BnprobeError("the pickle holds a storage view of torch before 0.4, which bnprobe does not read")
        return self._storage(Storage(str(key)[:100], kind.dtype, numel, str(location)[:100]))


class StorageType:
    """torch.FloatStorage and friends, named in a pickle: their dtype."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype

    def __call__(self, *args: Any) -> Any:
        raise BnprobeError("the pickle builds a storage itself instead of naming one of the file's")


# Protocol 5's out-of-band buffers and bytearrays: torch.save never writes them, and CPython's unpickler, given a
# forged BYTEARRAY8 length, fails to free the bytearray cleanly and prints a second line on stderr.
OUT_OF_BAND = {"BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER"}


def pickle_end(data: bytes, start: int, where: str) -> int:
    """Where the pickle that begins at `start` of `data` ends (after its STOP), its opcodes walked without running
    any (pickletools.genops); one that is cut short, malformed or uses OUT_OF_BAND opcodes is one line."""
    stream = io.BytesIO(data)
    stream.seek(start)
    try:
        for opcode, _, _ in pickletools.genops(stream):
            if opcode.name in OUT_OF_BAND:
                raise BnprobeError(f"{where}: its pickle uses {opcode.name}, which torch.save never writes")
    except (ValueError, EOFError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        text = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise BnprobeError(f"{where}: not a readable pickle ({text})") from None
    return stream.tell()


def inert_load(data: bytes, storage: Callable[[Storage], Storage], where: str) -> Any:
    """The object the pickle `data` holds, read inertly (see the module); `where` names the pickle in errors."""
    if len(data) > MAX_PICKLE_BYTES:
        raise BnprobeError(f"{where}: its pickle is {len(data):,} bytes, more than the {MAX_PICKLE_BYTES >> 20} "
                           f"MiB bnprobe reads (a state dict's takes ~200 bytes a tensor)")
    if b"\x96" in data or b"\x97" in data or b"\x98" in data:  # maybe OUT_OF_BAND: walk the opcodes to know
        pickle_end(data, 0, where)
    try:
        return InertUnpickler(io.BytesIO(data), storage).load()
    except BnprobeError as exc:
        raise BnprobeError(f"{where}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            RecursionError, MemoryError, OverflowError, UnicodeDecodeError, NotImplementedError) as exc:
        text = " ".join(str(exc).split())[:160] or "it ends early"
        raise BnprobeError(f"{where}: not a readable pickle ({type(exc).__name__}: {text})") from None


def stands_in(obj: Any) -> tuple[collections.Counter, collections.Counter]:
    """The stand-ins an inertly loaded object holds (each once): by the top-level module of their class, and by
    the top-level key of `obj` they sit under. Walked without recursion, each container once."""
    modules: collections.Counter = collections.Counter()
    keys: collections.Counter = collections.Counter()
    tops = obj.items() if isinstance(obj, dict) else [("", obj)]
    pending = collections.deque((str(key), value) for key, value in tops)
    seen: set = set()
    while pending:
        top, value = pending.popleft()
        if id(value) in seen or not isinstance(value, (Stand, dict, list, tuple, set, frozenset)):
            continue
        seen.add(id(value))
        if isinstance(value, Stand):
            modules[value.module.partition(".")[0]] += 1
            keys[top] += 1
            inner: Any = value.contents()
        else:
            inner = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        pending.extend((top, item) for item in inner)
    return modules, keys


def stand_note(obj: Any) -> str:
    """One line of what was stood in for, e.g. "12 omegaconf objects, 1 argparse object in hyper_parameters stood
    in for (their classes neither imported nor run)"; "" when nothing was."""
    modules, keys = stands_in(obj)
    if not modules:
        return ""
    parts = [f"{count:,} {module} object{'s' if count != 1 else ''}" for module, count in modules.most_common(4)]
    more = sum(modules.values()) - sum(count for _, count in modules.most_common(4))
    where = [key for key, _ in keys.most_common(3) if key]
    return (", ".join(parts) + (f" and {more:,} more" if more else "")
            + (f" in {', '.join(where)}" if where else "") + " stood in for (their classes neither imported nor run)")
