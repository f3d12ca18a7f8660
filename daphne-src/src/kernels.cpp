// kernels.cpp - implementation of the stand-in's kernels library
// (compiled into lib/libdaphnekernels.so).
#include "kernels.h"

#include <unistd.h>

#include <climits>

namespace daphne_standin {

const char* kernels_version() { return "0.1.0"; }

namespace {
// Sum of squares 1^2 + ... + k^2 = k (k+1) (2k+1) / 6, exact in 128 bits for
// k <= kMaxN (the product is below 2.1e27, far below 2^128 ~ 3.4e38).
u128 prefix_sum_of_squares(std::uint64_t k) {
    const u128 kk = k;
    return kk * (kk + 1) * (2 * kk + 1) / 6;
}
}  // namespace

u128 sum_of_squares(std::uint64_t lo, std::uint64_t hi, bool* ok) {
    if (ok) *ok = true;
    if (hi > kMaxN) {
        if (ok) *ok = false;
        return 0;
    }
    if (lo > hi) return 0;          // empty range
    if (lo == 0) lo = 1;            // 0^2 contributes nothing
    if (lo > hi) return 0;
    return prefix_sum_of_squares(hi) - prefix_sum_of_squares(lo - 1);
}

std::uint64_t fnv1a64(const void* data, std::size_t len) {
    const auto* p = static_cast<const unsigned char*>(data);
    std::uint64_t h = 14695981039346656037ULL;  // FNV offset basis
    for (std::size_t i = 0; i < len; ++i) {
        h ^= p[i];
        h *= 1099511628211ULL;  // FNV prime
    }
    return h;
}

std::string hex64(std::uint64_t v) {
    static const char digits[] = "0123456789abcdef";
    std::string s(16, '0');
    for (int i = 15; i >= 0; --i) {
        s[static_cast<std::size_t>(i)] = digits[v & 0xF];
        v >>= 4;
    }
    return s;
}

std::string u128_to_decimal(u128 v) {
    if (v == 0) return "0";
    char buf[40];  // 2^128 - 1 has 39 decimal digits
    int pos = 40;
    while (v != 0) {
        buf[--pos] = static_cast<char>('0' + static_cast<int>(v % 10));
        v /= 10;
    }
    return std::string(buf + pos, buf + 40);
}

bool parse_u64(const std::string& s, std::uint64_t& out) {
    if (s.empty()) return false;
    std::uint64_t v = 0;
    for (char c : s) {
        if (c < '0' || c > '9') return false;
        const std::uint64_t d = static_cast<std::uint64_t>(c - '0');
        if (v > (UINT64_MAX - d) / 10) return false;  // overflow
        v = v * 10 + d;
    }
    out = v;
    return true;
}

std::string local_hostname() {
    char buf[256];
    if (gethostname(buf, sizeof buf) != 0) return "unknown";
    buf[sizeof buf - 1] = '\0';  // POSIX does not guarantee termination on truncation
    return std::string(buf);
}

}  // namespace daphne_standin
