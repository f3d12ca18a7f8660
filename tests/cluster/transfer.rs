//! Placeholder: the transfer tests.
