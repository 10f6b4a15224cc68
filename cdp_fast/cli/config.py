"""Config files (``--config``) for `cdp-fast sample` / `cdp-fast train`, and the replay of a
sampling run from its out directory (``sample --from-manifest``).

A config file is one flat mapping (``.json``; ``.yaml`` / ``.yml`` when PyYAML is installed:
``pip install cdp_fast[config]``, else exit 1 saying so). Its keys are the library's keyword
names (:func:`cdp_fast.sample`, :func:`cdp_fast.train_trades`: ``lam``, ``tau_plus``,
``guide_window``, ``batch_size``, ``progress``, ...), the command's own options under their flag
names with ``_`` for ``-`` (``npz``, ``grid``, ``feature_input``, ``arch``, ``data``, ``out``),
and the library keywords that have no flag (:data:`API_ONLY`: sample ``shard_size``,
``init_std``; train ``momentum``, ``weight_decay``, ``nesterov``, ``augment``,
``steps_per_epoch``, ``resume``, ``amp``, ``compile``), passed to the call as they are. Values
are what the library takes (``guide_window: [200, 800]`` or ``null``, ``clip_x0: true``,
``image_shape: [1, 8, 8]``, ``ema: null``, ``progress: false``) or what the flag takes
(``guide_window: all``); ``null`` elsewhere is the flag's default. A flag on the command line
overrides the file. An unknown key is one line on stderr naming it and the nearest valid key
(exit 2), as is a value the flag would refuse. Relative paths are read from the current
directory, as on the command line.

Replay: `cdp-fast sample --out gen/` also writes ``gen/sample-config.json`` — the run's
settings in this config form (not the outputs ``npz`` / ``grid`` nor the machine settings
``device`` / ``compile`` / ``progress``; existing paths made absolute) — before a fresh run
starts and again when it ends. ``--from-manifest gen/manifest.json`` (or ``gen/``) reads it
as a config under the other layers (manifest < ``--config`` < command line), with ``out``
``gen/``: the same command resumes the run; ``--out other/`` replays it into another
directory (the shards are compared with the original's sha256 at the end: a replay that
differs is warned about); a larger ``--n`` into ``gen/`` extends it — the finished full shards
are kept (sample i depends on (seed, i) and its shard only: :mod:`cdp_fast.sampling.driver`),
a last partial shard is made again, and the result is the run a fresh call with that ``n``
makes. A smaller ``--n`` into ``gen/`` is refused by the library (``n`` changed).
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

__all__ = ["API_ONLY", "RECORD", "add_config_flags", "apply_config", "replay_run"]

#: library keywords without a flag that a config file may set (passed to the call as they are)
API_ONLY = {"sample": ("shard_size", "init_std"),
            "train": ("momentum", "weight_decay", "nesterov", "augment", "steps_per_epoch", "resume", "amp",
                      "compile")}
#: the file `cdp-fast sample --out DIR` writes into DIR: the run's settings as a config
RECORD = "sample-config.json"
_WORDS = {"digits", "auto", "none", "pixels"}     # spec words, never paths
_PATHS = ("model", "features", "labeler", "real", "class_labels")
_UNSET = object()


def add_config_flags(parser, replay: bool = False):
    """``--config`` (and, with ``replay``, ``--from-manifest``) on a subcommand's parser."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="read options from a .json / .yaml file whose keys are the library's keyword names "
                             "(flags on the command line override it; see README 'Config files')")
    if replay:
        parser.add_argument("--from-manifest", default=None, metavar="MANIFEST",
                            help="replay the run recorded in an out directory (DIR/manifest.json or DIR; its "
                                 f"{RECORD}): into DIR by default (resume; a larger --n extends it), or --out NEW")
    parser.set_defaults(api_kwargs=None)


# ----------------------------------------------------------------------------- reading files
def _no_duplicates(pairs, where):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"{where}: the key {k!r} appears twice")
        out[k] = v
    return out


def load_file(path, flag: str = "config") -> dict:
    """The mapping in a .json / .yaml / .yml file; ValueError naming ``flag`` and the file for
    a missing file, bad syntax, a repeated key or a top level that is not a mapping;
    ImportError naming the extra for YAML without PyYAML."""
    p = Path(path)
    where = f"{flag}: {path}"
    if not p.is_file():
        raise ValueError(f"{where} does not exist" if not p.exists() else f"{where} is not a file")
    suffix = p.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ValueError(f"{where}: give a .json, .yaml or .yml file")
    text = p.read_text()
    if suffix == ".json":
        try:
            data = json.loads(text, object_pairs_hook=lambda pairs: _no_duplicates(pairs, where))
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ImportError(f"{where}: reading YAML needs PyYAML: pip install cdp_fast[config] (or pyyaml); "
                              "a .json config needs nothing") from None

        class _Loader(yaml.SafeLoader):
            pass

        def mapping(loader, node):
            return _no_duplicates(loader.construct_pairs(node, deep=True), where)

        _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
        try:
            data = yaml.load(text, Loader=_Loader)   # a SafeLoader: plain data only
        except yaml.YAMLError as e:
            raise ValueError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValueError(f"{where}: the top level must be a mapping of option names to values, got "
                         f"{type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- keys and values
def _actions(sp):
    """{config key: [argparse actions]} of a subcommand (``no_progress`` is keyed ``progress``)."""
    out = {}
    for a in sp._actions:   # (argparse keeps them here; there is no public accessor)
        if not a.option_strings or a.dest in ("help", "config", "from_manifest"):
            continue
        out.setdefault("progress" if a.dest == "no_progress" else a.dest, []).append(a)
    return out


def _special(key, v):
    """Library spellings of values the flag spells otherwise -> the flag's spelling."""
    if key == "loss" and v is None:
        return "none"
    if key == "embedding" and v is None:
        return "none"
    if key == "guide_window":
        return ["all"] if v is None else [v] if isinstance(v, str) else v
    if key in ("clip_x0", "compile") and isinstance(v, bool):
        return "true" if v else "false"
    if key == "clip_x0" and v is None:
        return "auto"
    if key in ("image_shape", "class_labels") and isinstance(v, (list, tuple)):
        return ",".join(str(e) for e in v)
    if key == "ema" and v is None:
        return 0
    return v


def _convert(where, key, actions, v):
    """(dest, value) as the flag's parse would give it; ValueError naming ``key`` otherwise."""
    a = actions[0]
    if key == "progress" or a.nargs == 0:     # on/off flags
        if key == "flip" and v is None:
            return "flip", None
        if not isinstance(v, bool):
            raise ValueError(f"{where}: {key}: expected true or false, got {v!r}")
        if key == "progress":
            return "no_progress", not v
        if key == "flip":
            return "flip", v
        return a.dest, v if a.const is True else not v
    v = _special(key, v)
    if v is None:
        return a.dest, a.default
    many = a.nargs in ("+", "*")
    if isinstance(v, (list, tuple)) != many or isinstance(v, (dict, bool)) or (
            many and any(isinstance(e, (list, tuple, dict, bool)) or e is None for e in v)):
        raise ValueError(f"{where}: {key}: {v!r} is not a value of --{key.replace('_', '-')}")
    vals = []
    for e in (v if many else [v]):
        s = repr(e) if isinstance(e, float) else str(e)
        if a.type is not None:
            try:
                e = a.type(s)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
                why = {int: "expected an int", float: "expected a number"}.get(a.type, str(err))
                raise ValueError(f"{where}: {key}: {why}, got {v!r}") from None
        else:
            e = s
        if a.choices is not None and e not in a.choices:
            raise ValueError(f"{where}: {key}: {e!r} is not one of {', '.join(map(str, a.choices))}")
        vals.append(e)
    return a.dest, vals if many else vals[0]


def _layer(where, data, actions, api_only, args, given):
    """Set ``data``'s keys on ``args`` unless the command line gave them."""
    for key, v in data.items():
        if key in api_only and key not in actions:
            if isinstance(v, (list, dict)):
                raise ValueError(f"{where}: {key}: expected a single value, got {v!r}")
            args.api_kwargs = {**(args.api_kwargs or {}), key: v}
            continue
        if key not in actions:
            valid = sorted(actions) + list(api_only)
            near = difflib.get_close_matches(key.replace("-", "_"), valid, n=1, cutoff=0.5)
            hint = f" (did you mean {near[0]!r}?)" if near else " (the keys are the library's keyword names)"
            raise ValueError(f"{where}: unknown key {key!r}{hint}")
        dest, value = _convert(where, key, actions[key], v)
        if dest not in given:
            setattr(args, dest, value)


def apply_config(sp, args, rest):
    """``args`` (the parse of ``rest``, the arguments after the subcommand, by its parser
    ``sp``) with the layers of ``--from-manifest`` and ``--config`` under the flags given in
    ``rest``. Returns ``args``; ValueError / ImportError as :func:`load_file`."""
    probe = type(args)(**{k: _UNSET for k in vars(args)})
    given = {k for k, v in vars(sp.parse_args(rest, namespace=probe)).items() if v is not _UNSET}
    actions = _actions(sp)
    api_only = API_ONLY.get(args.command, ())
    if getattr(args, "from_manifest", None):
        where, data = _replay_layer(args.from_manifest)
        _layer(where, data, actions, api_only, args, given)
    if args.config:
        _layer(f"config: {args.config}", load_file(args.config), actions, api_only, args, given)
    return args


# ----------------------------------------------------------------------------- sample replay
def _manifest_path(value) -> Path:
    p = Path(value)
    return p / "manifest.json" if p.is_dir() else p


def _read_manifest(path: Path, flag="from-manifest") -> dict:
    if not path.is_file():
        raise ValueError(f"{flag}: {path} does not exist")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag}: {path} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != "cdp_fast.samples":
        raise ValueError(f"{flag}: {path} is not the manifest of a cdp_fast.sample out directory")
    return m


def _replay_layer(value):
    """(where, config) of a recorded run: its sample-config.json, out = its directory."""
    path = _manifest_path(value)
    m = _read_manifest(path)
    rec = path.parent / RECORD
    if not rec.is_file():
        raise ValueError(f"from-manifest: {path.parent} has no {RECORD}: only runs made by `cdp-fast sample --out` "
                         "record their settings (an API run records fingerprints of its arguments, not the "
                         "models and data behind them)")
    data = load_file(rec, "from-manifest")
    args = m.get("args") or {}
    for k in ("n", "seed"):
        if k in data and k in args and data[k] != args[k]:
            raise ValueError(f"from-manifest: {rec} ({k}={data[k]!r}) does not match {path} ({k}={args[k]!r})")
    return f"from-manifest: {rec}", {**data, "out": str(path.parent)}


def sample_record(a) -> dict:
    """The settings of a `cdp-fast sample` namespace in config form (what :data:`RECORD` holds)."""
    out = {}
    for key in ("model", "n", "loss", "features", "embedding", "feature_input", "form", "guide_window", "lam", "tau",
                "tau_plus", "beta", "positive", "negatives", "real", "num_classes", "class_labels", "labeler",
                "steps", "skip", "eta", "solver", "nfe", "clip_x0", "T", "betas", "image_shape", "batch_size",
                "output", "seed", "dtype"):
        if not hasattr(a, key):
            continue
        v = getattr(a, key)
        if key in _PATHS and isinstance(v, str) and v not in _WORDS and os.path.exists(v):
            v = os.path.abspath(v)
        out[key] = v
    out.update(a.api_kwargs or {})
    return out


@contextmanager
def replay_run(a):
    """Around `cdp-fast sample`'s library call (rank 0 only; no effect without ``--out``):
    records the settings (:data:`RECORD`) before a fresh run and after the call; for
    ``--from-manifest`` into its own directory with a larger ``n``, grows the manifest first
    (full shards kept, a partial last one dropped; put back if the call is refused); for a
    replay into another directory, warns when its shards differ from the original's."""
    from cdp_fast.utils import distributed as cdist
    from cdp_fast.utils.io import atomic_write_json

    if not a.out or not cdist.is_main():
        yield
        return
    out = Path(a.out)
    record = sample_record(a)
    if not (out / "manifest.json").exists():
        out.mkdir(exist_ok=True)
        atomic_write_json(out / RECORD, record)
    source = _manifest_path(a.from_manifest) if getattr(a, "from_manifest", None) else None
    undo = None
    if source is not None and source.parent.resolve() == out.resolve():
        undo = _grow(out, a.n)
    try:
        yield
    except BaseException:
        if undo is not None:
            undo()
        raise
    atomic_write_json(out / RECORD, record)
    if source is not None and source.parent.resolve() != out.resolve():
        _compare(source, out / "manifest.json")


def _grow(out: Path, n: int):
    """Grow a recorded run's manifest to ``n`` rows (under the directory's lock); a function
    that puts the old manifest back (if nothing changed it since), or None when n does not grow."""
    from cdp_fast.sampling.stream import DirLock
    from cdp_fast.utils.io import atomic_write_bytes, atomic_write_json

    path = out / "manifest.json"
    lock = DirLock(out).acquire()
    try:
        before = path.read_bytes()
        m = _read_manifest(path)
        if int(n) <= int(m["n"]):
            return None
        size = int(m["shard_size"])
        m["args"]["n"] = m["n"] = int(n)
        m["num_shards"] = math.ceil(int(n) / size)
        m["shards"] = {k: v for k, v in m["shards"].items() if int(v.get("count", -1)) == size}
        m["complete"] = False
        atomic_write_json(path, m)
        grown = path.read_bytes()
    finally:
        lock.release()

    def undo():
        if path.read_bytes() == grown:
            atomic_write_bytes(path, before)
    return undo


def _compare(source: Path, new: Path) -> None:
    """Warn when a replay's shards or arguments differ from the original run's."""
    old, now = _read_manifest(source), _read_manifest(new)
    oa, na = dict(old.get("args") or {}), dict(now.get("args") or {})
    oa.pop("n", None), na.pop("n", None)
    args = sorted(k for k in set(oa) | set(na) if oa.get(k) != na.get(k))
    shards = sorted(k for k, v in now.get("shards", {}).items()
                    if k in old.get("shards", {}) and old["shards"][k].get("count") == v.get("count")
                    and old["shards"][k].get("sha256") != v.get("sha256"))
    if args or shards:
        warnings.warn(f"from-manifest: the replay in {new.parent} differs from {source.parent}: "
                      + "; ".join(filter(None, [args and "arguments " + ", ".join(args),
                                                shards and "shards " + ", ".join(shards)])))
