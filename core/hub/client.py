"""The Hub client and its errors. Every call to the Hub goes through `calling(what)`, which turns the
library's exceptions into one SolError line that says what to do."""
from __future__ import annotations

import contextlib
import os

from ..errors import SolError


class Gated(SolError):
    """The repository asks each user to accept its licence; `url` is where."""

    def __init__(self, repo: str, url: str, token_given: bool):
        self.repo, self.url = repo, url
        how = "the token given has no access yet" if token_given else \
            "then give a token (HF_TOKEN, or `hf auth login`)"
        super().__init__(f"{repo} is gated: accept its licence at {url}, {how}")


class Cancelled(SolError):
    """A download stopped on request (the GUI's Cancel)."""


class Unreachable(SolError):
    """The Hub cannot be asked: no network, or HF_HUB_OFFLINE=1. What is cached still works."""


class Silent:
    """A progress bar that shows nothing: huggingface_hub takes any class with tqdm's few methods."""

    def __init__(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def offline() -> bool:
    """HF_HUB_OFFLINE=1 (read now, so a test or the GUI can set it after huggingface_hub was imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on") or \
        _library_offline()


def _library_offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    from huggingface_hub import constants
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or constants.ENDPOINT


def headers_for(url: str, location: str, token=None) -> dict:
    """The request headers for fetching a file's bytes from `location` (where the Hub's `url` redirects): the
    token goes to the Hub's own host only, never to a CDN, as huggingface_hub's own downloads do."""
    from urllib.parse import urlsplit

    from huggingface_hub.utils import build_hf_headers
    same = urlsplit(url).netloc == urlsplit(location).netloc
    return build_hf_headers(token=token if same else False)


def api():
    from huggingface_hub import HfApi
    return HfApi(endpoint=endpoint())


@contextlib.contextmanager
def calling(what: str, repo: str | None = None, token: str | None = None):
    """Run a Hub call; its failures become one SolError line naming `what` and the remedy."""
    from huggingface_hub import errors as hf
    try:
        yield
    except hf.OfflineModeIsEnabled:
        raise Unreachable(f"{what}: HF_HUB_OFFLINE=1 is set, so the Hub is not asked; unset it to reach "
                          f"{endpoint()}") from None
    except hf.GatedRepoError:
        raise Gated(repo or "?", f"{endpoint()}/{repo}", bool(token)) from None
    except hf.RepositoryNotFoundError:
        raise SolError(f"{what}: no repository {repo!r} on {endpoint()} (check the name; a private one needs "
                       "a token: HF_TOKEN, or `hf auth login`)") from None
    except hf.RevisionNotFoundError:
        raise SolError(f"{what}: {repo} has no such revision; give a branch, tag or commit with --revision") from None
    except hf.RemoteEntryNotFoundError as e:
        raise SolError(f"{what}: {repo} has no such file ({_first_line(e)})") from None
    except hf.HfHubHTTPError as e:
        raise SolError(f"{what}: the Hub answered {_first_line(e)}") from None
    except Exception as e:
        if not _network(e):
            raise
        raise Unreachable(f"{what}: cannot reach {endpoint()} ({type(e).__name__}: {_first_line(e)}); check the "
                          "network, or set HF_HUB_OFFLINE=1 to use only what is cached") from None


NETWORK = ("ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "RemoteProtocolError",
           "ReadError", "ConnectionError")


def _network(e: BaseException) -> bool:
    """A failure to reach the Hub, whichever HTTP client this huggingface_hub uses (httpx2, httpx, requests)."""
    return isinstance(e, ConnectionError) or any(c.__name__ in NETWORK for c in type(e).__mro__)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
