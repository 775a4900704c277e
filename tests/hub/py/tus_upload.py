"""Uploads one artifact to logbook-hub with the stock tus client (tuspy).

Usage: tus_upload.py HUB_URL DEVICE_TOKEN SESSION_ID FILE ARTIFACT_PATH
"""
import hashlib
import sys

from tusclient import client

hub, token, session_id, file_path, artifact_path = sys.argv[1:6]
with open(file_path, "rb") as f:
    sha256 = hashlib.sha256(f.read()).hexdigest()

tus = client.TusClient(
    hub + "/api/v1/ingest/uploads",
    headers={"Authorization": "Bearer " + token},
)
uploader = tus.uploader(
    file_path,
    chunk_size=64 * 1024,
    metadata={
        "session_id": session_id,
        "path": artifact_path,
        "content_type": "text/plain",
        "sha256": sha256,
    },
)
uploader.upload()
print(uploader.url)
