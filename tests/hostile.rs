//! Hostile input end to end.
