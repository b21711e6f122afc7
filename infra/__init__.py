"""Plumbing under the stages: the artifact store, Dask, S3, paths, digests, deployment files."""

from infra.s3 import use_bounded_s3

use_bounded_s3()  # every process that touches the store (driver, Dask workers, torchrun ranks) imports infra
