// util.h - small process helpers shared by both binaries of the stand-in.
#pragma once

namespace daphne_standin {

// If the environment variable DAPHNE_ARGV_DUMP is set to a non-empty path,
// write argv[0..argc) to that file, each argument followed by a NUL byte, so
// tests can check that arguments arrive byte-identical through ssh, srun and
// apptainer.  Every "%p" in the path is replaced by the process id.  Failures
// are reported on stderr but are not fatal.
void dump_argv_if_requested(int argc, char** argv);

// Ignore SIGPIPE for the whole process (sockets use MSG_NOSIGNAL as well).
void ignore_sigpipe();

}  // namespace daphne_standin
