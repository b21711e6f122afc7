"""S3 through s3fs, without the one wait that no timeout bounds.

botocore sends `Expect: 100-continue` with S3 uploads, and aiohttp then waits for the server's
interim "100 Continue" before sending the body, with no timeout on that wait: against an endpoint
that accepts connections but stops answering (an overloaded gateway, a paused process), every
write hangs forever while reads fail after `read_timeout` (measured against a SIGSTOPped SeaweedFS:
PUTs still waiting after 90 s, GETs failing; without the header, PUTs fail like GETs). The header
only saves re-sending a body the server would refuse, which for our object sizes (chunks of a few
MB, small JSON files) costs nothing, so our S3 clients go without it.

s3fs also tries each request 5 times (`retries`, a class attribute it takes no option for) and a
whole-object read (`cat_file`, which zarr's chunk reads use) tries those 5 tries 5 times again: a
chunk read from a hung endpoint took 25 read timeouts to fail (75 s at `read_timeout: 1`). Our
filesystem takes `retries` as a storage option, so that a run can bound how long an outage takes
to surface (2 gives at most 4 tries).

`use_bounded_s3()` makes fsspec build this filesystem for `s3://` URLs in this process; the
artifact store calls it on import, so the driver, Dask workers and training processes all do.
"""

from __future__ import annotations

from typing import Any

import fsspec
import s3fs
from botocore.handlers import add_expect_header

S3_PROTOCOLS = ("s3", "s3a")


class S3FileSystemWithoutExpect(s3fs.S3FileSystem):
    """s3fs's filesystem whose clients send uploads without `Expect: 100-continue`, and which
    takes s3fs's tries per request as the `retries` option (default s3fs's 5)."""

    def __init__(self, *args: Any, retries: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if retries is not None:
            if retries < 1:
                raise ValueError(f"storage_options.retries must be at least 1 (tries per request), not {retries}")
            self.retries = retries

    async def set_session(self, refresh: bool = False, kwargs: dict[str, Any] | None = None) -> Any:
        client = await super().set_session(refresh=refresh, kwargs=kwargs or {})
        client.meta.events.unregister("before-call.s3", add_expect_header)
        return client


def use_bounded_s3() -> None:
    """Build `S3FileSystemWithoutExpect` for s3:// (and s3a://) URLs from now on, in this process."""
    for protocol in S3_PROTOCOLS:
        if fsspec.get_filesystem_class(protocol) is not S3FileSystemWithoutExpect:
            fsspec.register_implementation(protocol, S3FileSystemWithoutExpect, clobber=True)
