// kernels.h - the "kernels" of the DAPHNE stand-in.
//
// Real DAPHNE compiles DaphneDSL scripts to MLIR and calls pre-compiled
// kernels from a shared library at runtime.  The stand-in mimics that split:
// everything that does actual "work" lives in lib/libdaphnekernels.so, which
// both bin/daphne and bin/DistributedWorker link against and load at runtime
// (found through RPATH $ORIGIN/../lib, so the bin/ + lib/ tree is relocatable).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace daphne_standin {

// 128-bit unsigned integer used for all sums (sum of squares up to 1e9 is
// about 3.3e26, which does not fit into 64 bits).
using u128 = unsigned __int128;

// Largest accepted problem size n (the `n=` script argument) and therefore the
// largest index a worker accepts in a range.
constexpr std::uint64_t kMaxN = 1000000000ULL;

// Version string of the kernels library (also reported by both binaries).
const char* kernels_version();

// Sum of i*i for i in [lo, hi] (inclusive).  Returns 0 for an empty range
// (lo > hi).  Precondition: hi <= kMaxN (checked; larger values return 0 and
// set *ok to false when ok is non-null).
u128 sum_of_squares(std::uint64_t lo, std::uint64_t hi, bool* ok = nullptr);

// FNV-1a 64-bit hash of a byte string (the "script hash").
std::uint64_t fnv1a64(const void* data, std::size_t len);
inline std::uint64_t fnv1a64(const std::string& s) { return fnv1a64(s.data(), s.size()); }

// 16 lowercase hex digits, zero-padded.
std::string hex64(std::uint64_t v);

// Decimal representation of a u128 (no leading zeros; "0" for zero).
std::string u128_to_decimal(u128 v);

// Parse a non-empty string consisting only of ASCII digits into a u64.
// Returns false on any non-digit, on empty input and on overflow.
bool parse_u64(const std::string& s, std::uint64_t& out);

// The local host name as returned by gethostname() ("unknown" on failure).
std::string local_hostname();

}  // namespace daphne_standin
