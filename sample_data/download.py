"""Sample scans too large to ship in the package, downloaded on first use with `pooch`.

Each file is pinned by its sha256 (`REGISTRY`) and kept in the user's cache folder (`samples/`
under `$AR3D_CACHE_DIR`, else the platform's user cache folder, as the feature cache); a second
use reads it from there. A download shows a progress bar; no connection, a server error or a file
whose sha256 differs is one clear `Ar3dEnvironmentError` and leaves nothing half-written in the cache.

The files are served from `$AR3D_SAMPLE_URL` (a folder URL, http or https) when set, else from
`DEFAULT_URL`. The TCIA files below have **no public URL**: TCIA publishes the
Brain-Tumor-Progression collection as DICOM series, and these NIfTI files are conversions of them
(SimpleITK, from the copy in udacity/nd320-c3-3d-med-imaging@cdf9ad89). So `DEFAULT_URL` is None and
the sample asks for `$AR3D_SAMPLE_URL` (a mirror of these files, such as a project release) until
the project publishes them; no address is invented here.
"""

from __future__ import annotations

import os
from pathlib import Path

from model_core.errors import Ar3dEnvironmentError

SAMPLE_URL_ENV = "AR3D_SAMPLE_URL"
# No published URL exists for these exact NIfTI files (see the module docstring): set $AR3D_SAMPLE_URL.
DEFAULT_URL: str | None = None

# TCIA Brain-Tumor-Progression (CC BY 3.0; Schmainda & Prah), patient PGBM-001, study 1991-11-19:
# T1 post-contrast and FLAIR (co-registered; 0.43-0.69 mm in-plane, 6.5 mm slices) and the
# collection's tumour mask, drawn on the T1 post-contrast grid.
REGISTRY = {
    "PGBM-001/1991-11-19/t1post.nii.gz": "sha256:dbbd4b0c356f4d1a2fcffabcd88a595616b57b2d48c92f03d812b23e2a942833",
    "PGBM-001/1991-11-19/flair.nii.gz": "sha256:b2819cefea13e66fb6cae2fb1280f70c197a2631d7d134f5a7e9de1050c0af50",
    "PGBM-001/1991-11-19/tumor.nii.gz": "sha256:15bc7f2c5db8ff21e7654353686080f3e95fafedba904f08244a33734441d6b8",
}


def sample_cache_dir() -> Path:
    """Where downloaded samples are kept: `samples/` beside the feature cache's folder."""
    from model_core.io.cache import user_cache

    return user_cache("samples")


def base_url() -> str:
    """The folder URL the files are fetched from (ends with "/"); raises when none is known."""
    url = os.environ.get(SAMPLE_URL_ENV) or DEFAULT_URL
    if not url:
        raise Ar3dEnvironmentError(
            f"this sample has no public download URL yet (TCIA publishes it as DICOM only); set {SAMPLE_URL_ENV} "
            "to a folder URL that holds its NIfTI files, or open the TotalSegmentator samples shipped in the package")
    return url if url.endswith("/") else url + "/"


def fetch(name: str, progressbar: bool = True) -> Path:
    """The local path of registry file `name`, downloaded (and its sha256 checked) on first use."""
    import pooch
    import requests

    url = base_url()
    fetcher = pooch.create(path=sample_cache_dir(), base_url=url, registry=REGISTRY)
    try:
        return Path(fetcher.fetch(name, progressbar=progressbar))
    except (requests.ConnectionError, requests.Timeout) as e:
        raise Ar3dEnvironmentError(f"cannot download the sample file {name} from {url}: no connection "
                                   f"({type(e).__name__}); connect to the internet and try again") from e
    except requests.HTTPError as e:
        raise Ar3dEnvironmentError(f"cannot download the sample file {name} from {url}: the server answered "
                                   f"{e.response.status_code if e.response is not None else e}") from e
    except ValueError as e:  # pooch: the downloaded file's sha256 differs from the pinned one (file discarded)
        raise Ar3dEnvironmentError(f"the sample file {name} downloaded from {url} is not the expected file "
                                   "(sha256 differs); it was discarded") from e
