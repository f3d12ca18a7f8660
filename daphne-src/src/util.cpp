// util.cpp - see util.h.
#include "util.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace daphne_standin {

void dump_argv_if_requested(int argc, char** argv) {
    const char* tmpl = std::getenv("DAPHNE_ARGV_DUMP");
    if (tmpl == nullptr || *tmpl == '\0') return;

    // Expand every "%p" into the pid.
    std::string path;
    const std::string pid = std::to_string(static_cast<long>(getpid()));
    for (const char* p = tmpl; *p != '\0'; ++p) {
        if (p[0] == '%' && p[1] == 'p') {
            path += pid;
            ++p;
        } else {
            path += *p;
        }
    }

    std::string data;
    for (int i = 0; i < argc; ++i) {
        data.append(argv[i]);
        data.push_back('\0');
    }

    const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        std::fprintf(stderr, "warning: cannot write DAPHNE_ARGV_DUMP file '%s': %s\n", path.c_str(),
                     std::strerror(errno));
        return;
    }
    std::size_t off = 0;
    while (off < data.size()) {
        const ssize_t w = write(fd, data.data() + off, data.size() - off);
        if (w < 0) {
            if (errno == EINTR) continue;
            std::fprintf(stderr, "warning: cannot write DAPHNE_ARGV_DUMP file '%s': %s\n",
                         path.c_str(), std::strerror(errno));
            break;
        }
        off += static_cast<std::size_t>(w);
    }
    if (close(fd) != 0 && off == data.size()) {
        std::fprintf(stderr, "warning: cannot write DAPHNE_ARGV_DUMP file '%s': %s\n", path.c_str(),
                     std::strerror(errno));
    }
}

void ignore_sigpipe() {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGPIPE, &sa, nullptr);
}

}  // namespace daphne_standin
