"""The base layer, imported by every stage: atomic file writes, logging and progress, provenance (utils), devices,
distributed runs and resumable training state (runtime), checkpoint reading (checkpoint), seeds (seeding), downloads
(download), code fingerprints (codehash), the Slurm multi-node launcher (launch), figures (plotting), caption words
(text), learning-rate schedules (schedule). Nothing is imported here."""
