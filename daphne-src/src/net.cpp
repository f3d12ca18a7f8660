// net.cpp - socket helpers and wire protocol; see net.h for the protocol.
#include "net.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <type_traits>

namespace daphne_standin {
namespace net {

// ---------------------------------------------------------------- basics --

std::int64_t now_ms() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<std::int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

std::string errno_string(int err) {
    char buf[256];
    // GNU strerror_r returns a char* (possibly not buf); XSI returns int.
    // Handle both without relying on which variant is selected.
    auto result = strerror_r(err, buf, sizeof buf);
    if constexpr (std::is_same_v<decltype(result), char*>) {
        return std::string(result);
    } else {
        if (result != 0) return "error " + std::to_string(err);
        return std::string(buf);
    }
}

bool parse_host_port(const std::string& spec, HostPort& out, std::string& err) {
    std::string host;
    std::string port;
    if (!spec.empty() && spec[0] == '[') {  // [ipv6]:port
        const auto close = spec.find(']');
        if (close == std::string::npos || close + 1 >= spec.size() || spec[close + 1] != ':') {
            err = "expected [address]:port";
            return false;
        }
        host = spec.substr(1, close - 1);
        port = spec.substr(close + 2);
    } else {
        const auto colon = spec.rfind(':');
        if (colon == std::string::npos) {
            err = "missing ':port'";
            return false;
        }
        host = spec.substr(0, colon);
        port = spec.substr(colon + 1);
    }
    if (host.empty()) {
        err = "empty host";
        return false;
    }
    std::uint64_t p = 0;
    if (!parse_u64(port, p) || p == 0 || p > 65535) {
        err = "invalid port '" + port + "' (expected 1-65535)";
        return false;
    }
    out.host = host;
    out.port = static_cast<std::uint16_t>(p);
    return true;
}

namespace {

void set_nonblocking(int fd) {
    const int flags = fcntl(fd, F_GETFL, 0);
    if (flags >= 0) fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

void set_socket_options(int fd) {
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

int remaining_ms(std::int64_t deadline_ms) {
    const std::int64_t left = deadline_ms - now_ms();
    if (left <= 0) return 0;
    if (left > 1000000) return 1000000;
    return static_cast<int>(left);
}

// Wait until fd is ready for `events` or the deadline passes.
// Returns 1 when ready, 0 on timeout, -1 on error (errno set).
int wait_fd(int fd, short events, std::int64_t deadline_ms) {
    for (;;) {
        struct pollfd pfd;
        pfd.fd = fd;
        pfd.events = events;
        pfd.revents = 0;
        const int r = poll(&pfd, 1, remaining_ms(deadline_ms));
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        return r == 0 ? 0 : 1;  // POLLERR/POLLHUP surface through the next read/write
    }
}

std::string timeout_text(std::int64_t deadline_ms, std::int64_t start_ms, const char* what) {
    const std::int64_t secs = (deadline_ms - start_ms + 999) / 1000;
    return std::string("timed out after ") + std::to_string(secs) + " s " + what;
}

// Big-endian encoding helpers.
void put_u64(std::string& b, std::uint64_t v) {
    for (int i = 7; i >= 0; --i) b.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
void put_u32(std::string& b, std::uint32_t v) {
    for (int i = 3; i >= 0; --i) b.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
std::uint64_t get_u64(const unsigned char* p) {
    std::uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v = (v << 8) | p[i];
    return v;
}
std::uint32_t get_u32(const unsigned char* p) {
    std::uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v = (v << 8) | p[i];
    return v;
}

}  // namespace

// ------------------------------------------------------------- transfers --

bool write_all(int fd, const void* buf, std::size_t n, std::int64_t deadline_ms, std::string& err) {
    const std::int64_t start = now_ms();
    const auto* p = static_cast<const char*>(buf);
    std::size_t off = 0;
    while (off < n) {
        const ssize_t w = send(fd, p + off, n - off, MSG_NOSIGNAL);
        if (w > 0) {
            off += static_cast<std::size_t>(w);
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            const int r = wait_fd(fd, POLLOUT, deadline_ms);
            if (r == 0) {
                err = timeout_text(deadline_ms, start, "while sending");
                return false;
            }
            if (r < 0) {
                err = "poll: " + errno_string(errno);
                return false;
            }
            continue;
        }
        err = "send: " + (w < 0 ? errno_string(errno) : std::string("no progress"));
        return false;
    }
    return true;
}

bool read_all(int fd, void* buf, std::size_t n, std::int64_t deadline_ms, std::string& err) {
    const std::int64_t start = now_ms();
    auto* p = static_cast<char*>(buf);
    std::size_t off = 0;
    while (off < n) {
        const ssize_t r = recv(fd, p + off, n - off, 0);
        if (r > 0) {
            off += static_cast<std::size_t>(r);
            continue;
        }
        if (r == 0) {
            err = off == 0 ? "connection closed by peer" : "connection closed by peer mid-message";
            return false;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            const int w = wait_fd(fd, POLLIN, deadline_ms);
            if (w == 0) {
                err = timeout_text(deadline_ms, start, "waiting for data");
                return false;
            }
            if (w < 0) {
                err = "poll: " + errno_string(errno);
                return false;
            }
            continue;
        }
        err = "recv: " + errno_string(errno);
        return false;
    }
    return true;
}

// -------------------------------------------------------------- protocol --

bool send_request(int fd, const Request& req, std::int64_t deadline_ms, std::string& err) {
    std::string b;
    b.reserve(40 + req.script.size());
    b.append(kRequestMagic, 8);
    put_u64(b, req.lo);
    put_u64(b, req.hi);
    put_u64(b, req.script_hash);
    put_u64(b, req.script.size());
    b.append(req.script);
    return write_all(fd, b.data(), b.size(), deadline_ms, err);
}

bool recv_request(int fd, Request& req, std::int64_t deadline_ms, std::string& err) {
    unsigned char hdr[40];
    if (!read_all(fd, hdr, sizeof hdr, deadline_ms, err)) return false;
    if (std::memcmp(hdr, kRequestMagic, 8) != 0) {
        err = "protocol error: bad request magic";
        return false;
    }
    req.lo = get_u64(hdr + 8);
    req.hi = get_u64(hdr + 16);
    req.script_hash = get_u64(hdr + 24);
    const std::uint64_t len = get_u64(hdr + 32);
    if (len > kMaxScriptBytes) {
        err = "protocol error: script of " + std::to_string(len) + " bytes exceeds the limit of " +
              std::to_string(kMaxScriptBytes) + " bytes";
        return false;
    }
    req.script.assign(static_cast<std::size_t>(len), '\0');
    if (len > 0 && !read_all(fd, &req.script[0], req.script.size(), deadline_ms, err)) return false;
    return true;
}

bool send_response(int fd, const Response& resp, std::int64_t deadline_ms, std::string& err) {
    std::string text = resp.text;
    if (text.size() > kMaxTextBytes) text.resize(kMaxTextBytes);
    std::string b;
    b.reserve(37 + text.size());
    b.append(kResponseMagic, 8);
    b.push_back(static_cast<char>(resp.status));
    put_u64(b, resp.script_hash);
    put_u64(b, static_cast<std::uint64_t>(resp.partial >> 64));
    put_u64(b, static_cast<std::uint64_t>(resp.partial));
    put_u32(b, static_cast<std::uint32_t>(text.size()));
    b.append(text);
    return write_all(fd, b.data(), b.size(), deadline_ms, err);
}

bool recv_response(int fd, Response& resp, std::int64_t deadline_ms, std::string& err) {
    unsigned char hdr[37];
    if (!read_all(fd, hdr, sizeof hdr, deadline_ms, err)) return false;
    if (std::memcmp(hdr, kResponseMagic, 8) != 0) {
        err = "protocol error: bad response magic (not a DAPHNE stand-in worker?)";
        return false;
    }
    resp.status = hdr[8];
    resp.script_hash = get_u64(hdr + 9);
    resp.partial = (static_cast<u128>(get_u64(hdr + 17)) << 64) | get_u64(hdr + 25);
    const std::uint32_t len = get_u32(hdr + 33);
    if (len > kMaxTextBytes) {
        err = "protocol error: response text too long";
        return false;
    }
    resp.text.assign(len, '\0');
    if (len > 0 && !read_all(fd, &resp.text[0], len, deadline_ms, err)) return false;
    return true;
}

// --------------------------------------------------------------- sockets --

void configure_socket(int fd) {
    set_nonblocking(fd);
    set_socket_options(fd);
}

int connect_with_timeout(const HostPort& hp, int timeout_ms, std::string& err) {
    const std::int64_t deadline = now_ms() + timeout_ms;
    struct addrinfo hints;
    std::memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    struct addrinfo* res = nullptr;
    const std::string port = std::to_string(hp.port);
    const int gai = getaddrinfo(hp.host.c_str(), port.c_str(), &hints, &res);
    if (gai != 0) {
        err = "cannot resolve host '" + hp.host + "': " +
              (gai == EAI_SYSTEM ? errno_string(errno) : std::string(gai_strerror(gai)));
        return -1;
    }

    err = "no usable address";
    int fd = -1;
    for (struct addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
        if (fd < 0) {
            err = "socket: " + errno_string(errno);
            continue;
        }
        set_socket_options(fd);
        int rc = connect(fd, ai->ai_addr, ai->ai_addrlen);
        if (rc != 0 && (errno == EINPROGRESS || errno == EINTR)) {
            const int w = wait_fd(fd, POLLOUT, deadline);
            if (w == 0) {
                err = "connect timed out after " + std::to_string((timeout_ms + 999) / 1000) + " s";
                close(fd);
                fd = -1;
                break;  // the time budget is used up
            }
            int soerr = 0;
            socklen_t len = sizeof soerr;
            if (w < 0) {
                soerr = errno;
            } else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) != 0) {
                soerr = errno;
            }
            if (soerr == 0) rc = 0;
            else errno = soerr;
        }
        if (rc == 0) break;  // connected
        err = errno_string(errno);
        close(fd);
        fd = -1;
        if (now_ms() >= deadline) break;
    }
    freeaddrinfo(res);
    return fd;
}

int listen_on(const HostPort& hp, std::string& err) {
    struct addrinfo hints;
    std::memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    hints.ai_flags = AI_PASSIVE;
    struct addrinfo* res = nullptr;
    const std::string port = std::to_string(hp.port);
    const int gai = getaddrinfo(hp.host.c_str(), port.c_str(), &hints, &res);
    if (gai != 0) {
        err = "cannot resolve address '" + hp.host + "': " +
              (gai == EAI_SYSTEM ? errno_string(errno) : std::string(gai_strerror(gai)));
        return -1;
    }
    err = "no usable address";
    int fd = -1;
    for (struct addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            err = "socket: " + errno_string(errno);
            continue;
        }
        const int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
            err = "bind: " + errno_string(errno);
            close(fd);
            fd = -1;
            continue;
        }
        if (listen(fd, 128) != 0) {
            err = "listen: " + errno_string(errno);
            close(fd);
            fd = -1;
            continue;
        }
        set_nonblocking(fd);
        break;
    }
    freeaddrinfo(res);
    return fd;
}

std::string peer_address(int fd) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getpeername(fd, reinterpret_cast<struct sockaddr*>(&ss), &len) != 0) return "?";
    char host[NI_MAXHOST];
    if (getnameinfo(reinterpret_cast<struct sockaddr*>(&ss), len, host, sizeof host, nullptr, 0,
                    NI_NUMERICHOST) != 0)
        return "?";
    return std::string(host);
}

}  // namespace net
}  // namespace daphne_standin
