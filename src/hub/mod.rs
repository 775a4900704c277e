//! The fleet server `logbook-hub`: batch ingest, uploads, Sessions API.
