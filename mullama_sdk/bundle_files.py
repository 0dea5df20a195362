"""A bundle's files on disk against its manifest: names resolved safely inside the folder, sizes and
sha256 checked, the GGUF header's dimensions compared - all before anything native loads them."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from mullama_sdk.errors import BundleError
from mullama_sdk.files import sha256_file
from mullama_sdk.manifest import Manifest


def safe_member(bundle_dir: Path, name: str) -> Path:
    """Resolve a manifest file name inside ``bundle_dir``; refuse absolute paths, ``..`` and links out."""
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name or "\0" in name:
        raise BundleError(f"manifest names the file {name!r}: only plain paths inside the bundle are allowed")
    try:
        path = (bundle_dir / pure).resolve()
        root = bundle_dir.resolve()
    except (OSError, RuntimeError) as e:  # a name too long for the OS, a symlink loop
        raise BundleError(f"manifest file {name!r} cannot be resolved inside the bundle: {e}") from e
    if root not in path.parents:
        raise BundleError(f"manifest file {name!r} resolves outside the bundle folder ({path})")
    return path


def check_files(bundle_dir: Path, manifest: Manifest, names: list[str], *, sha256: bool = False) -> None:
    """Every named file exists inside the bundle with the listed size (and sha256 when asked)."""
    for name in names:
        entry = manifest.files[name]
        path = safe_member(Path(bundle_dir), name)
        try:
            size = path.stat().st_size if path.is_file() else None
        except OSError as e:
            raise BundleError(f"bundle file {name} cannot be read: {e}") from e
        if size is None:
            raise BundleError(f"bundle file missing: {name} (expected in {bundle_dir})")
        if size != entry.size:
            raise BundleError(
                f"bundle file {name} has {size} bytes, the manifest says {entry.size}: truncated or replaced"
            )
        if sha256 and sha256_file(path) != entry.sha256:
            raise BundleError(f"bundle file {name} fails its sha256 check: corrupted or replaced")


def check_gguf_dims(path: Path, manifest: Manifest) -> None:
    """The GGUF's own hyper-parameters agree with the manifest (read from its header, no native load)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure means the same thing here
        raise BundleError(f"{path.name} is not a readable GGUF file: {e}") from e

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        if f is None:
            raise BundleError(f"{path.name} lacks GGUF field {key}")
        return f.contents()

    d = manifest.dims
    checks = {
        "llama.embedding_length": d.n_embd, "llama.block_count": d.n_layer,
        "llama.attention.head_count": d.n_head, "llama.feed_forward_length": d.n_ff,
    }
    if "llama.attention.head_count_kv" in reader.fields:  # llama.cpp's default when absent: head_count
        checks["llama.attention.head_count_kv"] = d.n_head_kv
    try:
        for key, want in checks.items():
            got = field(key)
            if int(got) != want:
                raise BundleError(f"{path.name}: {key} = {got}, but the manifest says {want}")
        n_vocab = len(field("tokenizer.ggml.tokens"))
        if n_vocab != d.n_vocab:
            raise BundleError(f"{path.name} has {n_vocab} tokens, the manifest says n_vocab = {d.n_vocab}")
        layers = [int(x) for x in field("mullama.inject_layers")]
    except (TypeError, ValueError) as e:  # a field of the wrong type
        raise BundleError(f"{path.name} has a malformed GGUF header field: {e}") from e
    if tuple(layers) != manifest.inject_layers:
        raise BundleError(f"{path.name}: mullama.inject_layers {layers} != manifest {list(manifest.inject_layers)}")
