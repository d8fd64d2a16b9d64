/* A pointer chase: the host's memory latency as one CPU sees it (bench/host_latency.py).
 * setup(mib): a random cyclic permutation of the buffer's 64-byte lines, one per line;
 * chase(n): follow it n times, return the mean ns per load (each load depends on the last). */
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

static size_t *line;
static size_t at;

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

int setup(size_t mib)
{
    size_t n = (mib << 20) / 64, i;
    size_t *order = malloc(n * sizeof *order);
    uint64_t x = 88172645463325252u;

    line = aligned_alloc(64, n * 64);
    if (!order || !line)
        return -1;
    for (i = 0; i < n; i++)
        order[i] = i;
    for (i = n - 1; i > 0; i--) {  /* Fisher-Yates with xorshift64 */
        size_t j, t;
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        j = x % (i + 1);
        t = order[i]; order[i] = order[j]; order[j] = t;
    }
    for (i = 0; i < n; i++)
        line[order[i] * 8] = order[(i + 1) % n] * 8;
    free(order);
    at = 0;
    return 0;
}

double chase(long loads)
{
    uint64_t t = now_ns();
    size_t p = at;
    for (long k = 0; k < loads; k++)
        p = line[p];
    at = p;
    return (double)(now_ns() - t) / (double)loads;
}
