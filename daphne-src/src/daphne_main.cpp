// daphne_main.cpp - bin/daphne (the coordinator) of the DAPHNE stand-in.
//
//   daphne [options] SCRIPT [name=value ...]
//
// The script is not interpreted: it is read as bytes and hashed (FNV-1a 64).
// The "work" is the sum of i*i for i in 1..=n (n from the `n=` argument,
// default 1000000).  With --distributed, [1..n] is split into one contiguous
// slice per worker listed in DISTRIBUTED_WORKERS and every worker computes
// its slice (see net.h for the protocol).
//
// Exit status: 0 success, 1 usage/argument error, 2 a worker failed,
//              3 unsupported backend (MPI).
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "kernels.h"
#include "net.h"
#include "util.h"

namespace ds = daphne_standin;
namespace net = daphne_standin::net;

namespace {

constexpr const char* kVersion = "0.1.0";
constexpr int kConnectTimeoutMs = 5000;  // per worker
constexpr int kIoTimeoutMs = 30000;      // per worker: send request + receive reply
constexpr std::uint64_t kDefaultN = 1000000;

const char* const kUsage =
    "Usage: daphne [options] SCRIPT [name=value ...]\n"
    "\n"
    "DAPHNE stand-in: reads SCRIPT (a .daph file, or '-' for stdin) as bytes and\n"
    "computes sum(i*i, i=1..n), locally or on the workers in DISTRIBUTED_WORKERS.\n"
    "\n"
    "Options:\n"
    "  --distributed                 run on the workers listed in the environment\n"
    "                                variable DISTRIBUTED_WORKERS=host:port,...\n"
    "  --dist_backend=BACKEND        sync-gRPC (default), async-gRPC or MPI\n"
    "                                (MPI is not supported by the stand-in)\n"
    "  --vec                         accepted (vectorized engine; no effect)\n"
    "  --select-matrix-repr          accepted (no effect)\n"
    "  --explain=PASSES              accepted (no effect)\n"
    "  --help                        print this help and exit\n"
    "\n"
    "Script arguments:\n"
    "  n=N                           problem size, 1 <= N <= 1000000000 (default 1000000)\n";

[[noreturn]] void usage_error(const std::string& msg) {
    std::fprintf(stderr, "error: %s\n%s", msg.c_str(), kUsage);
    std::exit(1);
}

[[noreturn]] void fail(int code, const std::string& msg) {
    std::fprintf(stderr, "error: %s\n", msg.c_str());
    std::exit(code);
}

// Read a whole file (or stdin for "-") as bytes.
bool read_script(const std::string& path, std::string& out, std::string& err) {
    int fd = 0;
    if (path != "-") {
        fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            err = std::strerror(errno);
            return false;
        }
    }
    char buf[65536];
    for (;;) {
        const ssize_t r = read(fd, buf, sizeof buf);
        if (r > 0) {
            out.append(buf, static_cast<std::size_t>(r));
            if (out.size() > net::kMaxScriptBytes) {
                err = "script larger than " + std::to_string(net::kMaxScriptBytes) + " bytes";
                if (fd != 0) close(fd);
                return false;
            }
            continue;
        }
        if (r == 0) break;
        if (errno == EINTR) continue;
        err = std::strerror(errno);
        if (fd != 0) close(fd);
        return false;
    }
    if (fd != 0) close(fd);
    return true;
}

struct WorkerJob {
    std::string spec;  // "host:port" exactly as listed in DISTRIBUTED_WORKERS
    net::HostPort hp;
    std::uint64_t lo = 0, hi = 0;
    // results
    bool ok = false;
    std::string hostname;
    ds::u128 partial = 0;
    std::string error;  // reason, printed as "error: worker <spec> <reason>"
};

void run_worker_job(WorkerJob& job, const std::string& script, std::uint64_t hash) {
    std::string err;
    const int fd = net::connect_with_timeout(job.hp, kConnectTimeoutMs, err);
    if (fd < 0) {
        job.error = "unreachable: " + err;
        return;
    }
    const std::int64_t deadline = net::now_ms() + kIoTimeoutMs;
    net::Request req;
    req.lo = job.lo;
    req.hi = job.hi;
    req.script_hash = hash;
    req.script = script;
    net::Response resp;
    if (!net::send_request(fd, req, deadline, err)) {
        job.error = "failed sending request: " + err;
    } else if (!net::recv_response(fd, resp, deadline, err)) {
        job.error = "failed receiving reply: " + err;
    } else if (resp.status != net::kStatusOk) {
        job.error = "reported an error: " + resp.text;
    } else if (resp.script_hash != hash) {
        job.error = "script hash mismatch: expected " + ds::hex64(hash) + " got " +
                    ds::hex64(resp.script_hash);
    } else {
        job.ok = true;
        job.hostname = resp.text;
        job.partial = resp.partial;
    }
    close(fd);
}

// Split a comma-separated worker list; blanks around entries are ignored and
// empty entries (e.g. a trailing comma) are skipped.
std::vector<std::string> split_workers(const std::string& s) {
    std::vector<std::string> out;
    std::size_t start = 0;
    while (start <= s.size()) {
        std::size_t end = s.find(',', start);
        if (end == std::string::npos) end = s.size();
        std::string item = s.substr(start, end - start);
        const auto b = item.find_first_not_of(" \t\r\n");
        const auto e = item.find_last_not_of(" \t\r\n");
        if (b != std::string::npos) out.push_back(item.substr(b, e - b + 1));
        start = end + 1;
    }
    return out;
}

int run_distributed(const std::string& script, std::uint64_t hash, std::uint64_t n) {
    const char* env = std::getenv("DISTRIBUTED_WORKERS");
    const std::vector<std::string> specs = split_workers(env ? env : "");
    if (specs.empty()) fail(1, "DISTRIBUTED_WORKERS is empty; set it to host:port,...");

    std::vector<WorkerJob> jobs(specs.size());
    for (std::size_t i = 0; i < specs.size(); ++i) {
        std::string err;
        jobs[i].spec = specs[i];
        if (!net::parse_host_port(specs[i], jobs[i].hp, err))
            fail(1, "invalid entry '" + specs[i] + "' in DISTRIBUTED_WORKERS (" + err +
                        "); expected host:port,...");
    }

    // Contiguous near-equal slices: the first (n % W) workers get one more.
    const std::uint64_t w = jobs.size();
    const std::uint64_t base = n / w, extra = n % w;
    std::uint64_t next = 1;
    for (std::uint64_t i = 0; i < w; ++i) {
        const std::uint64_t len = base + (i < extra ? 1 : 0);
        jobs[i].lo = next;
        jobs[i].hi = next + len - 1;  // len == 0 gives hi = lo - 1: an empty slice
        next += len;
    }

    // One thread per worker so the wall time does not scale with W.
    std::vector<std::thread> threads;
    threads.reserve(jobs.size());
    for (auto& job : jobs) {
        try {
            threads.emplace_back([&job, &script, hash] { run_worker_job(job, script, hash); });
        } catch (const std::system_error&) {
            run_worker_job(job, script, hash);  // could not start a thread: do it inline
        }
    }
    for (auto& t : threads) t.join();

    bool all_ok = true;
    for (const auto& job : jobs) {
        if (!job.ok) {
            std::fprintf(stderr, "error: worker %s %s\n", job.spec.c_str(), job.error.c_str());
            all_ok = false;
        }
    }
    if (!all_ok) return 2;

    ds::u128 total = 0;
    for (const auto& job : jobs) {
        std::printf("worker %s host=%s partial=%s\n", job.spec.c_str(), job.hostname.c_str(),
                    ds::u128_to_decimal(job.partial).c_str());
        total += job.partial;
    }
    std::printf("result: %s\n", ds::u128_to_decimal(total).c_str());
    std::fflush(stdout);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    ds::dump_argv_if_requested(argc, argv);
    ds::ignore_sigpipe();

    bool distributed = false;
    std::string backend = "sync-gRPC";
    int i = 1;
    for (; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "-" || a.empty() || a[0] != '-') break;  // SCRIPT
        if (a == "--help") {
            std::fputs(kUsage, stdout);
            return 0;
        } else if (a == "--distributed") {
            distributed = true;
        } else if (a.rfind("--dist_backend=", 0) == 0) {
            backend = a.substr(std::strlen("--dist_backend="));
            if (backend != "sync-gRPC" && backend != "async-gRPC" && backend != "MPI")
                usage_error("unknown --dist_backend '" + backend +
                            "' (expected sync-gRPC, async-gRPC or MPI)");
        } else if (a == "--vec" || a == "--select-matrix-repr" || a.rfind("--explain=", 0) == 0) {
            // accepted for compatibility; no effect in the stand-in
        } else {
            usage_error("unknown option '" + a + "'");
        }
    }
    if (i >= argc) usage_error("missing SCRIPT");
    const std::string script_path = argv[i++];

    std::map<std::string, std::string> args;
    for (; i < argc; ++i) {
        const std::string a = argv[i];
        const auto eq = a.find('=');
        if (eq == std::string::npos || eq == 0)
            usage_error("script argument '" + a + "' is not of the form name=value");
        args[a.substr(0, eq)] = a.substr(eq + 1);
    }

    std::uint64_t n = kDefaultN;
    if (auto it = args.find("n"); it != args.end()) {
        if (!ds::parse_u64(it->second, n) || n == 0 || n > ds::kMaxN)
            fail(1, "invalid value for script argument n: '" + it->second +
                        "' (expected an integer between 1 and 1000000000)");
    }

    if (backend == "MPI")
        fail(3, "the stand-in was built without MPI support (--dist_backend=MPI)");

    std::string script, err;
    if (!read_script(script_path, script, err))
        fail(1, "cannot read script '" + script_path + "': " + err);
    const std::uint64_t hash = ds::fnv1a64(script);
    // Diagnostics go to stderr; stdout carries only the result lines.
    std::fprintf(stderr, "daphne stand-in %s: script %s (%zu bytes, hash %s)\n", kVersion,
                 script_path.c_str(), script.size(), ds::hex64(hash).c_str());

    if (distributed) return run_distributed(script, hash, n);

    std::printf("result: %s\n", ds::u128_to_decimal(ds::sum_of_squares(1, n)).c_str());
    std::fflush(stdout);
    return 0;
}
