/*
 * The guest side of bench/net.rb: a static binary the benchmark compiles (`cc -static`)
 * and runs in every guest (ours, slirp, passt), so each back-end is timed by the same
 * code with CLOCK_MONOTONIC in the guest. Busybox `nc` in a shell loop would time
 * fork/exec as much as the network.
 *
 *   net_guest up   IP PORT BYTES      connect, send BYTES, half-close, read the sink's
 *                                     "count crc32" line: prints
 *                                     "up <us> <bytes sent> <crc32 sent> <reply>"
 *   net_guest down IP PORT BYTES      connect, read to EOF into memory, then CRC it:
 *                                     "down <us> <bytes> <crc32>"
 *   net_guest rr   IP PORT N          N times: connect, send 1 byte, read 1, close:
 *                                     "rr <n ok> <failures> <p50 us> <p90 us> <max us>"
 *   net_guest dns  IP PORT N          N UDP A queries for bench.test, each waited for:
 *                                     "dns <n ok> <failures> <p50 us> <p90 us> <max us>"
 *   net_guest hold IP PORT N          opens N connections (1 byte each way), prints
 *                                     "held <n>", then waits until the server closes all
 *
 * Everything is bounded: every socket has a 30 s receive/send timeout, and a bulk
 * transfer stops after 120 s (it then reports the bytes it got through, which the host
 * does not count as a result).
 * The CRC is zlib's CRC-32 (the host checks it with Zlib.crc32); it is computed outside
 * every timed section.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32_update(uint32_t crc, const unsigned char *p, size_t n) {
    crc = ~crc;
    while (n--) crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static int64_t now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

static struct sockaddr_in target;

/* A bulk transfer gives up after this long (a back-end that crawls still ends). */
#define TRANSFER_LIMIT_US (120 * 1000000LL)

static int dial(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct timeval tv = {30, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&target, sizeof target) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Writes until done, an error or `deadline`; returns the bytes written. */
static size_t write_until(int fd, const unsigned char *p, size_t n, int64_t deadline) {
    size_t done = 0;
    while (done < n && now_us() < deadline) {
        size_t piece = n - done < (1 << 20) ? n - done : (1 << 20);
        ssize_t w = write(fd, p + done, piece);
        if (w <= 0) break;
        done += (size_t)w;
    }
    return done;
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static void report(const char *name, int64_t *samples, long ok, long failed) {
    if (ok == 0) {
        printf("%s 0 %ld 0 0 0\n", name, failed);
        return;
    }
    qsort(samples, (size_t)ok, sizeof *samples, cmp64);
    printf("%s %ld %ld %lld %lld %lld\n", name, ok, failed, (long long)samples[(ok - 1) / 2],
           (long long)samples[(ok * 9 - 1) / 10], (long long)samples[ok - 1]);
}

/* A pseudo-random buffer (xorshift): compresses nowhere, so no layer can cheat. */
static unsigned char *pattern(size_t n) {
    unsigned char *buf = malloc(n);
    if (!buf) return NULL;
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf[i] = (unsigned char)x;
    }
    return buf;
}

static int up(long bytes) {
    unsigned char *buf = pattern((size_t)bytes);
    if (!buf) return 1;
    int64_t t0 = now_us();
    int fd = dial();
    if (fd < 0) {
        perror("up");
        return 1;
    }
    size_t sent = write_until(fd, buf, (size_t)bytes, t0 + TRANSFER_LIMIT_US);
    shutdown(fd, SHUT_WR);
    char reply[128];
    size_t got = 0;
    ssize_t r;
    /* Up to the reply's newline, not to end of stream: Debian 12's passt never passes the
     * host's FIN on to a guest that half-closed first (the reply arrives, the FIN not). */
    while (got < sizeof reply - 1 && !memchr(reply, '\n', got) && (r = read(fd, reply + got, sizeof reply - 1 - got)) > 0)
        got += (size_t)r;
    int64_t t1 = now_us();
    reply[got] = 0;
    reply[strcspn(reply, "\r\n")] = 0;
    close(fd);
    printf("up %lld %zu %u %s\n", (long long)(t1 - t0), sent, crc32_update(0, buf, sent), got ? reply : "none");
    return 0;
}

static int down(long bytes) {
    /* Room for what the source announced and a little more (a longer stream shows). */
    size_t cap = (size_t)bytes + 65536;
    unsigned char *buf = malloc(cap);
    if (!buf) return 1;
    /* Touch every page before the clock starts, with a non-zero byte: the compiler folds
     * malloc + memset(0) into calloc, which leaves a fresh mmap untouched, and the timed
     * read then faulted in the whole buffer (16,384 guest page faults, each also a host
     * page fault of QEMU's, ~0.1 s of the guest's CPU per 64 MiB on a 2-core host). */
    memset(buf, 0xa5, cap);
    int64_t t0 = now_us();
    int fd = dial();
    if (fd < 0) {
        perror("down");
        return 1;
    }
    size_t got = 0;
    ssize_t r;
    while (got < cap && now_us() < t0 + TRANSFER_LIMIT_US && (r = read(fd, buf + got, cap - got)) > 0) got += (size_t)r;
    int64_t t1 = now_us();
    close(fd);
    printf("down %lld %zu %u\n", (long long)(t1 - t0), got, crc32_update(0, buf, got));
    return 0;
}

static int rr(long n) {
    int64_t *s = calloc((size_t)n, sizeof *s);
    long ok = 0, failed = 0;
    for (long i = 0; i < n; i++) {
        int64_t t0 = now_us();
        int fd = dial();
        char c = 'x';
        if (fd < 0) {
            failed++;
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (write(fd, &c, 1) == 1 && read(fd, &c, 1) == 1) {
            s[ok++] = now_us() - t0;
        } else {
            failed++;
        }
        close(fd);
    }
    report("rr", s, ok, failed);
    return 0;
}

/* A DNS query for bench.test (A, IN) with the given id. */
static size_t dns_query(unsigned char *q, uint16_t id) {
    static const unsigned char tail[] = {0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 5, 'b', 'e', 'n', 'c', 'h',
                                         4, 't', 'e', 's', 't', 0, 0, 1, 0, 1};
    q[0] = (unsigned char)(id >> 8);
    q[1] = (unsigned char)id;
    memcpy(q + 2, tail, sizeof tail);
    return 2 + sizeof tail;
}

static int dns(long n) {
    int64_t *s = calloc((size_t)n, sizeof *s);
    long ok = 0, failed = 0;
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct timeval tv = {2, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&target, sizeof target) != 0) {
        perror("dns");
        return 1;
    }
    for (long i = 0; i < n; i++) {
        unsigned char q[64], a[1500];
        uint16_t id = (uint16_t)(i * 7919 + 1);
        size_t len = dns_query(q, id);
        int64_t t0 = now_us();
        if (send(fd, q, len, 0) != (ssize_t)len) {
            failed++;
            continue;
        }
        for (;;) {
            ssize_t r = recv(fd, a, sizeof a, 0);
            if (r < 0) {
                failed++;
                break;
            }
            if (r >= 12 && a[0] == q[0] && a[1] == q[1] && a[7] >= 1) { /* our id, >= 1 answer */
                s[ok++] = now_us() - t0;
                break;
            }
        }
    }
    report("dns", s, ok, failed);
    return 0;
}

static int hold(long n) {
    int *fds = calloc((size_t)n, sizeof *fds);
    long open = 0;
    for (long i = 0; i < n; i++) {
        int fd = dial();
        char c = 'x';
        if (fd < 0) break;
        if (write(fd, &c, 1) != 1 || read(fd, &c, 1) != 1) {
            close(fd);
            break;
        }
        fds[open++] = fd;
    }
    printf("held %ld\n", open);
    fflush(stdout);
    for (long i = 0; i < open; i++) {
        char buf[16];
        while (read(fds[i], buf, sizeof buf) > 0) {
        }
        close(fds[i]);
    }
    return open == n ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s up|down|rr|dns|hold IP PORT N\n", argv[0]);
        return 2;
    }
    crc_init();
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)atoi(argv[3]));
    if (inet_pton(AF_INET, argv[2], &target.sin_addr) != 1) return 2;
    long n = atol(argv[4]);
    if (n <= 0) return 2;
    if (!strcmp(argv[1], "up")) return up(n);
    if (!strcmp(argv[1], "down")) return down(n);
    if (!strcmp(argv[1], "rr")) return rr(n);
    if (!strcmp(argv[1], "dns")) return dns(n);
    if (!strcmp(argv[1], "hold")) return hold(n);
    return 2;
}
