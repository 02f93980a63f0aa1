"""Serves ``gs://`` from the folder ``$US3L_FAKE_GCS_ROOT`` (tests/fake_gcs.py) in a Python
process started with this folder and the repository on ``PYTHONPATH``: the tests run the
command lines on a bucket workdir as a user would. Does nothing without that variable."""
import os

if os.environ.get("US3L_FAKE_GCS_ROOT"):
    from tests import fake_gcs

    # Kept referenced: a collected context manager would close and uninstall the fake.
    SERVING = fake_gcs.install(os.environ["US3L_FAKE_GCS_ROOT"])
    SERVING.__enter__()  # for the whole process
