// The floor under the load bench's latencies: one loopback TCP round
// trip between two processes, at a fixed rate, latency measured from each
// message's intended send time (as the bench's open loop does). The
// sender keeps its schedule awake (timer slack 1 ns, the last 200 us
// spent spinning) and prints how late its sends were, so its own wake-up
// is not mistaken for the round trip's; the echo side blocks in read(2),
// as a proxy's idle thread blocks in epoll_wait(2).
//
//   cc -O2 -o /tmp/rtt benches/tools/rtt.c && /tmp/rtt 1000 5000
//
// Arguments: messages per second, messages, and round trips per message
// (default 1). Loopback only; every loop is bounded by its arguments.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: rtt RATE COUNT [TRIPS]\n");
        return 2;
    }
    int rate = atoi(argv[1]), n = atoi(argv[2]), trips = argc > 3 ? atoi(argv[3]) : 1;
    if (rate <= 0 || n <= 0 || trips <= 0) {
        fprintf(stderr, "rtt: RATE, COUNT and TRIPS must be positive\n");
        return 2;
    }
    int one = 1, ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (bind(ls, (void *)&a, sizeof a) || getsockname(ls, (void *)&a, &len) || listen(ls, 1)) {
        perror("rtt: listen");
        return 1;
    }
    if (fork() == 0) {
        // The echo side: answers each 64-byte message until the peer closes.
        int c = accept(ls, 0, 0);
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        char b[64];
        for (;;) {
            ssize_t r = read(c, b, sizeof b);
            if (r <= 0 || write(c, b, r) != r) _exit(0);
        }
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (void *)&a, sizeof a)) {
        perror("rtt: connect");
        return 1;
    }
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    // The default timer slack (50 us) lets a sleep end that much late.
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    double *lat = malloc(n * sizeof *lat), *late = malloc(n * sizeof *late);
    double start = now_us() + 1000, gap = 1e6 / rate;
    char b[64] = {0};
    for (int i = 0; i < n; i++) {
        double due = start + i * gap;
        // Sleep to 200 us before the send time, then wait it out awake, so
        // the sender's own wake-up is not counted: the echo side's is.
        for (double d = due - now_us(); d > 0; d = due - now_us()) {
            if (d > 250) {
                struct timespec t = {0, (long)((d - 200) * 1000)};
                nanosleep(&t, 0);
            }
        }
        late[i] = now_us() - due;
        for (int t = 0; t < trips; t++) {
            if (write(s, b, sizeof b) != sizeof b) return 1;
            for (int got = 0; got < (int)sizeof b;) {
                ssize_t r = read(s, b + got, sizeof b - got);
                if (r <= 0) return 1;
                got += r;
            }
        }
        lat[i] = now_us() - due;
    }
    qsort(lat, n, sizeof *lat, by_value);
    qsort(late, n, sizeof *late, by_value);
    printf("%d/s, %d messages of %d round trip(s): p50 %.0f us, p90 %.0f, p99 %.0f, max %.0f"
           " (sends late by p50 %.1f us, p99 %.1f)\n",
           rate, n, trips, lat[n / 2], lat[n * 9 / 10], lat[n * 99 / 100], lat[n - 1],
           late[n / 2], late[n * 99 / 100]);
    close(s);
    return 0;
}
