//! Payload packaging: reproducible tarball, manifest, checksums, verify and extract.
