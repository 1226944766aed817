/* LD_PRELOAD shim for the lab's js-libp2p peer: SO_REUSEADDR + SO_REUSEPORT on every TCP socket
 * before bind(). Node.js sets neither on a connecting socket, so a js peer cannot dial from its
 * listen port -- which a TCP hole punch needs (the peer's NAT mapping is the listen port's; a SYN
 * from a fresh port matches nothing). go-libp2p and our node set both; with this shim and
 * @libp2p/tcp's dialOpts.localPort (peer.mjs --reuse-port) the js peer dials as they do.
 * Built by scripts/natlab/interop_js:  cc -shared -fPIC -O2 -o reuseport.so reuseport.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <sys/socket.h>

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real_bind)(int, const struct sockaddr *, socklen_t);
    if (!real_bind)
        real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    int type = 0, one = 1;
    socklen_t tlen = sizeof type;
    if (addr && (addr->sa_family == AF_INET || addr->sa_family == AF_INET6) &&
        getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tlen) == 0 && type == SOCK_STREAM) {
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    }
    return real_bind(fd, addr, len);
}
