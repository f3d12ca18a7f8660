// worker_main.cpp - bin/DistributedWorker of the DAPHNE stand-in.
//
//   DistributedWorker <Address:Port> [ConfigFile]
//
// Binds ADDR:PORT (hostname, IPv4/IPv6 literal or 0.0.0.0) with SO_REUSEADDR
// and, only once listen() succeeded, prints
//     Started Distributed Worker on `ADDR:PORT`
// on stdout.  Every connection carries one request (see net.h) and is served
// on its own thread, so any number of coordinator runs, one after another or
// concurrently, can use the same worker.  SIGINT/SIGTERM end the worker with
// exit status 0.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>

#include "kernels.h"
#include "net.h"
#include "util.h"

namespace ds = daphne_standin;
namespace net = daphne_standin::net;

namespace {

constexpr int kIoTimeoutMs = 30000;  // per connection: read request + write reply

std::mutex g_log_mutex;
std::atomic<int> g_active_connections{0};

// printf-style line on stdout, serialised across threads and flushed at once
// (stdout is usually a log file, i.e. fully buffered).
void log_line(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void log_line(const char* fmt, ...) {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    va_list ap;
    va_start(ap, fmt);
    std::vfprintf(stdout, fmt, ap);
    va_end(ap);
    std::fputc('\n', stdout);
    std::fflush(stdout);
}

void usage_error() {
    std::fprintf(stderr, "Usage: DistributedWorker <Address:Port> [ConfigFile]\n");
    std::exit(1);
}

// Serve one connection: read the request, compute, reply, close.
void serve_connection(int fd) {
    const std::string peer = net::peer_address(fd);
    const std::int64_t deadline = net::now_ms() + kIoTimeoutMs;
    std::string err;
    net::Request req;
    if (!net::recv_request(fd, req, deadline, err)) {
        log_line("request from %s failed: %s", peer.c_str(), err.c_str());
        close(fd);
        return;
    }

    net::Response resp;
    resp.script_hash = ds::fnv1a64(req.script);
    std::string note;
    if (resp.script_hash != req.script_hash)
        note = " (coordinator sent hash " + ds::hex64(req.script_hash) + ": MISMATCH)";
    log_line("request from %s: range [%llu, %llu] script-hash %s%s", peer.c_str(),
             static_cast<unsigned long long>(req.lo), static_cast<unsigned long long>(req.hi),
             ds::hex64(resp.script_hash).c_str(), note.c_str());

    bool ok = true;
    if (req.lo <= req.hi && (req.lo == 0 || req.hi > ds::kMaxN)) {
        ok = false;
    } else {
        resp.partial = ds::sum_of_squares(req.lo, req.hi, &ok);
    }
    if (ok) {
        resp.status = net::kStatusOk;
        resp.text = ds::local_hostname();
    } else {
        resp.status = net::kStatusError;
        resp.partial = 0;
        resp.text = "invalid range [" + std::to_string(req.lo) + ", " + std::to_string(req.hi) +
                    "] (indices must be within 1.." + std::to_string(ds::kMaxN) + ")";
        log_line("request from %s rejected: %s", peer.c_str(), resp.text.c_str());
    }
    if (!net::send_response(fd, resp, deadline, err))
        log_line("reply to %s failed: %s", peer.c_str(), err.c_str());
    close(fd);
}

}  // namespace

int main(int argc, char** argv) {
    ds::dump_argv_if_requested(argc, argv);
    ds::ignore_sigpipe();

    if (argc < 2 || argc > 3) usage_error();
    const std::string addr = argv[1];
    net::HostPort hp;
    std::string err;
    if (!net::parse_host_port(addr, hp, err)) {
        std::fprintf(stderr, "error: invalid address `%s`: %s\n", addr.c_str(), err.c_str());
        usage_error();
    }

    // The config file is accepted for interface compatibility; the stand-in
    // only checks that it can be read.
    std::string config_note;
    if (argc == 3) {
        const int cfd = open(argv[2], O_RDONLY | O_CLOEXEC);
        if (cfd < 0) {
            std::fprintf(stderr, "error: cannot read config file '%s': %s\n", argv[2],
                         std::strerror(errno));
            return 1;
        }
        close(cfd);
        config_note = argv[2];
    }

    // Block SIGINT/SIGTERM before any thread exists (threads inherit the mask)
    // and receive them synchronously through a signalfd in the accept loop.
    // A shell starting us in the background (`worker &` without job control)
    // sets SIGINT to SIG_IGN.  Linux still queues blocked signals that are
    // ignored, but reset the dispositions anyway so that a signal arriving
    // before the mask is set ends the process instead of being lost.
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    if (pthread_sigmask(SIG_BLOCK, &sigs, nullptr) != 0) {
        std::fprintf(stderr, "error: pthread_sigmask failed\n");
        return 1;
    }
    const int sfd = signalfd(-1, &sigs, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0) {
        std::fprintf(stderr, "error: signalfd: %s\n", std::strerror(errno));
        return 1;
    }

    const int lfd = net::listen_on(hp, err);
    if (lfd < 0) {
        std::fprintf(stderr, "error: Distributed Worker cannot listen on `%s`: %s\n", addr.c_str(),
                     err.c_str());
        return 1;
    }

    log_line("Started Distributed Worker on `%s`", addr.c_str());
    if (!config_note.empty())
        log_line("config file: %s (accepted; not interpreted by the stand-in)", config_note.c_str());

    for (;;) {
        struct pollfd pfds[2];
        pfds[0].fd = lfd;
        pfds[0].events = POLLIN;
        pfds[0].revents = 0;
        pfds[1].fd = sfd;
        pfds[1].events = POLLIN;
        pfds[1].revents = 0;
        if (poll(pfds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            std::fprintf(stderr, "error: poll: %s\n", std::strerror(errno));
            return 1;
        }
        if (pfds[1].revents & POLLIN) {
            struct signalfd_siginfo si;
            const ssize_t r = read(sfd, &si, sizeof si);
            if (r == static_cast<ssize_t>(sizeof si)) {
                log_line("received %s", si.ssi_signo == SIGINT ? "SIGINT" : "SIGTERM");
                break;
            }
            continue;
        }
        if (pfds[0].revents & POLLIN) {
            const int cfd = accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
            if (cfd < 0) {
                if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                    log_line("accept: %s (retrying)", std::strerror(errno));
                    usleep(100000);
                }
                continue;  // EINTR, EAGAIN, ECONNABORTED, ...
            }
            net::configure_socket(cfd);
            g_active_connections.fetch_add(1);
            try {
                std::thread([cfd] {
                    serve_connection(cfd);
                    g_active_connections.fetch_sub(1);
                }).detach();
            } catch (const std::system_error& e) {
                // Could not start a thread: serve inline rather than drop it.
                serve_connection(cfd);
                g_active_connections.fetch_sub(1);
            }
        }
    }

    close(lfd);
    // Give in-flight requests (they take milliseconds) a moment to finish.
    const std::int64_t until = net::now_ms() + 2000;
    while (g_active_connections.load() > 0 && net::now_ms() < until) usleep(10000);
    log_line("Distributed Worker on `%s` shutting down", addr.c_str());
    std::fflush(stdout);
    // _exit: do not run static destructors while detached threads may still run.
    _exit(0);
}
