// net.h - socket helpers and the coordinator <-> worker wire protocol of the
// DAPHNE stand-in.  Compiled into both bin/daphne and bin/DistributedWorker.
//
// Wire protocol (one request and one response per TCP connection; all
// integers are unsigned big-endian):
//
//   Request (coordinator -> worker):
//     offset  size  field
//     0       8     magic "DAPHREQ1"
//     8       8     lo        first index of the slice (1-based, inclusive)
//     16      8     hi        last index of the slice (inclusive; lo > hi = empty)
//     24      8     hash      coordinator's FNV-1a 64-bit hash of the script
//     32      8     L         script length in bytes (at most kMaxScriptBytes)
//     40      L     script    the raw script bytes
//
//   Response (worker -> coordinator):
//     offset  size  field
//     0       8     magic "DAPHRSP1"
//     8       1     status    0 = ok, 1 = error
//     9       8     hash      worker's own FNV-1a 64-bit hash of the received script
//     17      8     sum_hi    partial sum, upper 64 bits
//     25      8     sum_lo    partial sum, lower 64 bits
//     33      4     T         text length (at most kMaxTextBytes)
//     37      T     text      status 0: the worker's hostname (gethostname)
//                             status 1: an error message
//
// The worker closes the connection after sending the response.
#pragma once

#include <cstdint>
#include <string>

#include "kernels.h"

namespace daphne_standin {
namespace net {

constexpr char kRequestMagic[9] = "DAPHREQ1";
constexpr char kResponseMagic[9] = "DAPHRSP1";
constexpr std::uint64_t kMaxScriptBytes = 64ULL * 1024 * 1024;
constexpr std::uint32_t kMaxTextBytes = 64 * 1024;

constexpr std::uint8_t kStatusOk = 0;
constexpr std::uint8_t kStatusError = 1;

struct Request {
    std::uint64_t lo = 0;
    std::uint64_t hi = 0;
    std::uint64_t script_hash = 0;
    std::string script;
};

struct Response {
    std::uint8_t status = kStatusOk;
    std::uint64_t script_hash = 0;
    u128 partial = 0;
    std::string text;  // hostname (ok) or error message (error)
};

// A parsed "host:port" (IPv6 literals may be written as "[addr]:port").
struct HostPort {
    std::string host;
    std::uint16_t port = 0;
};

// Parse "host:port".  The host must be non-empty and the port 1..65535.
bool parse_host_port(const std::string& spec, HostPort& out, std::string& err);

// Milliseconds on a monotonic clock; used for deadlines.
std::int64_t now_ms();

// strerror() as std::string, thread-safe.
std::string errno_string(int err);

// Read/write exactly n bytes on a (non-blocking or blocking) socket before
// the absolute deadline (now_ms() based).  Handles EINTR, EAGAIN and partial
// transfers; never raises SIGPIPE.  On failure returns false and sets err to
// a human-readable reason ("timed out ...", "connection closed by peer", ...).
bool write_all(int fd, const void* buf, std::size_t n, std::int64_t deadline_ms, std::string& err);
bool read_all(int fd, void* buf, std::size_t n, std::int64_t deadline_ms, std::string& err);

// Protocol messages (see the table above).
bool send_request(int fd, const Request& req, std::int64_t deadline_ms, std::string& err);
bool recv_request(int fd, Request& req, std::int64_t deadline_ms, std::string& err);
bool send_response(int fd, const Response& resp, std::int64_t deadline_ms, std::string& err);
bool recv_response(int fd, Response& resp, std::int64_t deadline_ms, std::string& err);

// Resolve and connect to hp within timeout_ms (all resolved addresses are
// tried within that budget).  Returns a connected non-blocking socket with
// SO_KEEPALIVE and TCP_NODELAY set, or -1 with err set.
int connect_with_timeout(const HostPort& hp, int timeout_ms, std::string& err);

// Resolve hp, create a socket with SO_REUSEADDR, bind and listen.  Returns the
// listening socket or -1 with err set.
int listen_on(const HostPort& hp, std::string& err);

// Configure an accepted socket (non-blocking, SO_KEEPALIVE, TCP_NODELAY).
void configure_socket(int fd);

// Numeric address of the peer of a connected socket ("?" on failure).
std::string peer_address(int fd);

}  // namespace net
}  // namespace daphne_standin
