"""Where bytes live: a local path, or a URL of any fsspec filesystem (s3://, gs://, hf://, file://).

The one place that opens, lists, writes and removes by URL, so that prepare's output, shard
patterns, manifests and the files beside shards (sizes.json, dataset.json) reach object storage
through the same few calls as the local disk.

- Credentials and endpoints come only from the filesystem's standard places (for S3: the AWS
  environment variables, ~/.aws/config and credentials, AWS_PROFILE, AWS_ENDPOINT_URL); nothing
  here takes or logs them.
- A write becomes visible only when complete: a local file through fileio's temp-and-rename; an
  object through its upload, which object stores publish only when it completes (a multipart
  upload is completed by close and aborted on error, so a killed writer leaves no object).
- Reads are sequential and bounded: a remote file is read through a read-ahead buffer of
  READ_BLOCK bytes, never downloaded whole unless the caller reads it whole.
- Missing objects, refused credentials and unreachable endpoints are one-line UserErrors naming
  the URL.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import BinaryIO

from mmpretrain.errors import UserError
from mmpretrain.fileio import AtomicFile
from mmpretrain.parallel import ordered_map

READ_BLOCK = 8 * 2**20  # read-ahead per open remote file: the memory a streamed shard holds
WRITE_BLOCK = 16 * 2**20  # multipart part size: an upload holds one part in memory
READ_AT_ONCE = 32  # requests in flight when many small remote files are read (read_many)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Schemes whose fsspec filesystem lives in a package of its own: the install hint of a missing one.
_PACKAGES = {"s3": ("s3fs", "mmpretrain-clip[s3]"), "s3a": ("s3fs", "mmpretrain-clip[s3]"),
             "gs": ("gcsfs", "gcsfs"), "gcs": ("gcsfs", "gcsfs"), "hf": ("huggingface_hub", "huggingface_hub"),
             "az": ("adlfs", "adlfs"), "abfs": ("adlfs", "adlfs")}
_CREDENTIALS_HINT = {
    "s3": "check the AWS credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws) "
          "and AWS_ENDPOINT_URL",
}


def is_url(path: str | os.PathLike) -> bool:
    """A URL with a scheme (s3://bucket/key, file:///tmp/x), as opposed to a local path."""
    return bool(_URL.match(str(path)))


def is_local(path: str | os.PathLike) -> bool:
    return not is_url(path) or str(path).startswith("file://")


def local_path(path: str | os.PathLike) -> str:
    """The local path of a local path or file:// URL."""
    text = str(path)
    return text[len("file://"):] if text.startswith("file://") else text


def scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if is_url(url) else ""


def join(base: str | os.PathLike, *parts: str) -> str:
    base = str(base)
    if is_local(base) and not base.startswith("file://"):
        return os.path.join(base, *parts)
    return posixpath.join(base.rstrip("/"), *parts)


def name(url: str | os.PathLike) -> str:
    return posixpath.basename(str(url).rstrip("/")) if is_url(url) else os.path.basename(os.fspath(url))


def parent(url: str | os.PathLike) -> str:
    text = str(url).rstrip("/")
    return text.rsplit("/", 1)[0] if is_url(text) else os.path.dirname(text)


def filesystem(url: str):
    """(fsspec filesystem, path within it) for a URL; a scheme whose package is not installed is a
    one-line error saying what to install."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        package, install = _PACKAGES.get(scheme(url), (scheme(url), scheme(url)))
        raise UserError(f"{url}: reading {scheme(url)}:// needs the {package} package; "
                        f"pip install '{install}'") from None
    except ValueError as e:
        raise UserError(f"{url}: not a storage URL fsspec knows ({e})") from None


class Missing(UserError):
    """A UserError for a file or object that does not exist (callers that treat a vanished file
    apart, like the shard reader, catch this one)."""


@contextmanager
def errors(url: str, doing: str = "read") -> Iterator[None]:
    """Storage failures as one line naming `url`: missing, refused, unreachable."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError:
        raise Missing(f"{url} does not exist; check the path") from None
    except (PermissionError, OSError, ValueError) as e:
        if _is_auth(e):
            hint = _CREDENTIALS_HINT.get(scheme(url), "check the credentials for this storage")
            raise UserError(f"{url}: access denied while trying to {doing} it ({_one_line(e)}); {hint}") from None
        if _is_unreachable(e):
            raise UserError(f"{url}: storage endpoint unreachable ({_one_line(e)}); check the network "
                            "and the endpoint (AWS_ENDPOINT_URL for S3-compatible servers)") from None
        if isinstance(e, OSError) and is_url(url) and not is_local(url):
            raise UserError(f"{url}: could not {doing} it ({_one_line(e)})") from None
        raise
    except Exception as e:  # botocore's own exceptions (NoCredentialsError, EndpointConnectionError)
        if is_url(url) and not is_local(url) and _is_unreachable(e):
            raise UserError(f"{url}: storage endpoint unreachable ({_one_line(e)}); check the network "
                            "and the endpoint (AWS_ENDPOINT_URL for S3-compatible servers)") from None
        if is_url(url) and not is_local(url) and _is_auth(e):
            hint = _CREDENTIALS_HINT.get(scheme(url), "check the credentials for this storage")
            raise UserError(f"{url}: no usable credentials ({_one_line(e)}); {hint}") from None
        raise


def _is_auth(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}"
    return isinstance(e, PermissionError) or any(
        word in text for word in ("NoCredentials", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                  "Forbidden", "403", "ExpiredToken"))


def _is_unreachable(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}"
    return any(word in text for word in ("EndpointConnectionError", "Could not connect", "Connection refused",
                                         "ConnectTimeout", "Name or service not known"))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def open_read(url: str | os.PathLike) -> BinaryIO:
    """A file to read from the start, sequentially (remote: through a READ_BLOCK read-ahead)."""
    if is_local(url):
        with errors(str(url)):
            return open(local_path(url), "rb")  # noqa: SIM115 - the caller closes it
    fs, path = filesystem(str(url))
    with errors(str(url)):
        return fs.open(path, "rb", block_size=READ_BLOCK, cache_type="readahead")


def read_bytes(url: str | os.PathLike) -> bytes:
    if is_local(url):
        with open_read(url) as fh, errors(str(url)):
            return fh.read()
    fs, path = filesystem(str(url))
    # One GET: open + read would ask for the object's size first, and so does s3fs's cat_file
    # unless it is told not to split the object into concurrent ranges.
    whole = {"max_concurrency": 1} if scheme(str(url)) in ("s3", "s3a") else {}
    with errors(str(url)):
        return fs.cat_file(path, **whole)


def read_many(urls: Sequence[str], at_once: int = READ_AT_ONCE) -> Iterator[bytes]:
    """The bytes of each of `urls`, in order. Remote ones are fetched `at_once` at a time: a large
    run's block summaries are 10^5 small objects, which read one round trip after another would
    take the better part of an hour. At most 2 x `at_once` are held ahead of the caller."""
    if all(is_local(u) for u in urls):
        yield from map(read_bytes, urls)
        return
    yield from ordered_map(read_bytes, urls, at_once, 2 * at_once, name="storage-read")


def read_text(url: str | os.PathLike) -> str:
    return read_bytes(url).decode("utf-8")


def exists(url: str | os.PathLike) -> bool:
    return _check(url, os.path.exists, "exists")


def isfile(url: str | os.PathLike) -> bool:
    return _check(url, os.path.isfile, "isfile")


def isdir(url: str | os.PathLike) -> bool:
    return _check(url, os.path.isdir, "isdir")


def _check(url: str | os.PathLike, local, method: str) -> bool:
    """One yes/no question about a path: os.path's `local` here, the filesystem's `method` remotely."""
    if is_local(url):
        return local(local_path(url))
    fs, path = filesystem(str(url))
    with errors(str(url)):
        return getattr(fs, method)(path)


def listdir(url: str | os.PathLike) -> list[str]:
    """Names directly inside a folder (an object prefix), sorted; [] when there is none."""
    if is_local(url):
        path = local_path(url)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, path = filesystem(str(url))
    with errors(str(url), "list"):
        try:
            entries = fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != path.rstrip("/"))


def glob(pattern: str) -> list[str]:
    """The URLs matching a glob pattern (remote: listed from the store), sorted."""
    fs, path = filesystem(pattern)
    with errors(pattern, "list"):
        found = fs.glob(path)
    return sorted(fs.unstrip_protocol(p) for p in found)


def find(url: str | os.PathLike) -> list[str]:
    """Every file below a folder (an object prefix), at any depth, sorted; [] when there is none."""
    if is_local(url):
        root = local_path(url)
        return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)
    fs, path = filesystem(str(url))
    with errors(str(url), "list"):
        found = fs.find(path)
    return sorted(fs.unstrip_protocol(p) for p in found)


def remove(url: str | os.PathLike, recursive: bool = False) -> None:
    """Remove a file (or a folder with `recursive`); nothing there is not an error."""
    if is_local(url):
        import shutil

        path = local_path(url)
        if recursive and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)
        return
    fs, path = filesystem(str(url))
    with errors(str(url), "remove"):
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass


def move(src: str, dst: str) -> None:
    """Move a file within one store: a rename locally (atomic), a server-side copy then delete remotely
    (the destination appears whole)."""
    if is_local(src) and is_local(dst):
        os.makedirs(os.path.dirname(local_path(dst)) or ".", exist_ok=True)
        os.replace(local_path(src), local_path(dst))
        return
    fs, path = filesystem(src)
    with errors(src, "move"):
        fs.mv(path, filesystem(dst)[1])


def create_new(url: str | os.PathLike, data: bytes) -> bool:
    """Write `data` to `url` unless something is there already; True when this call created it.
    Two processes, or two machines, that race for one name get one True between them: O_EXCL on a
    local or shared filesystem, a conditional upload (If-None-Match) on object storage (S3 and its
    compatible servers honour it)."""
    if is_local(url):
        path = local_path(url)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return True
    fs, path = filesystem(str(url))
    with errors(str(url), "create"):
        try:
            with fs.open(path, "xb") as fh:
                fh.write(data)
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError) as e:
            raise UserError(f"{url}: this storage cannot create a file only if it is absent ({_one_line(e)}); "
                            "let one process write the dataset files: run the parts, then --finalize") from None
    return True


def makedirs(url: str | os.PathLike) -> None:
    """A local folder is created; an object store has no folders to create."""
    if is_local(url):
        os.makedirs(local_path(url), exist_ok=True)


class _ObjectUpload:
    """An object that appears only when commit() completes its upload; discard() aborts it."""

    def __init__(self, url: str):
        self.url = url
        fs, path = filesystem(url)
        with errors(url, "write"):
            self.file = fs.open(path, "wb", block_size=WRITE_BLOCK)

    def write(self, data: bytes) -> int:
        with errors(self.url, "write"):
            return self.file.write(data)

    def commit(self) -> None:
        with errors(self.url, "write"):
            self.file.close()  # completes the upload: the object appears now, whole

    def discard(self) -> None:
        try:
            if hasattr(self.file, "discard"):
                self.file.discard()  # s3fs: aborts the multipart upload
                self.file.closed = True  # nothing is flushed on garbage collection
            else:
                self.file.close()
        except Exception:
            pass  # the upload is gone either way; the caller's exception is the one to see


def atomic_file(url: str | os.PathLike):
    """A file with write(), commit() and discard(): it appears at `url`, whole, on commit() only."""
    return AtomicFile(local_path(url)) if is_local(url) else _ObjectUpload(str(url))


@contextmanager
def atomic_writer(url: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that appears at `url` only when the block ends without error."""
    out = atomic_file(url)
    try:
        yield out.file
    except BaseException:
        out.discard()
        raise
    out.commit()


def write_bytes(url: str | os.PathLike, data: str | bytes) -> None:
    with atomic_writer(url) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
