/* The planned-replay device allocator (MEMO's executor): a step's requests at the offsets planned offline.
 *
 * Why: the caching allocator places each request where a free block of the moment fits, so at long context
 * the holes between live tensors of other sizes grow (5% of the peak at 256K tokens even from an emptied
 * cache, with or without expandable segments). A training step asks for the same sizes in the same order
 * every time, so one traced step is enough to lay every request out in one buffer, lifetimes known
 * (`traced_layout.py` places it); later steps get those addresses back by request number.
 *
 * Installed through torch.cuda.memory.CUDAPluggableAllocator, so it serves every device allocation of the
 * process. Outside a step window, and for any request that does not match the plan (another size or stream,
 * or its planned bytes still held by a tensor that lived longer than in the traced step), it falls back to a
 * cache of exact-size blocks over cudaMalloc; those fallbacks are counted. No CUDA headers: the runtime's
 * functions come in as pointers (`replay_set_backend`), so the same code runs on the CPU in tests. C++ only to
 * throw when the device is full: PyTorch turns the exception into a Python error, where a null pointer returned
 * to it would be written to by the next kernel (an illegal address, the CUDA context lost).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <iterator>
#include <map>
#include <new>
#include <stdexcept>

/* Planned blocks alive now, offset -> size (disjoint: a slot is taken only when free), to refuse a plan slot whose
 * bytes are still held; ordered, so the check is two neighbours (O(log n)), not every block alive. */
static std::map<int64_t, int64_t> held;

extern "C" {

typedef int (*device_malloc_fn)(void **, size_t);
typedef int (*device_free_fn)(void *);
typedef int (*device_sync_fn)(void);

static device_malloc_fn backend_malloc;
static device_free_fn backend_free;
static device_sync_fn backend_sync;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

enum { MODE_OFF = 0, MODE_TRACE = 1, MODE_REPLAY = 2 };

typedef struct {
    uintptr_t ptr;   /* 0: empty slot */
    int64_t size;
    int64_t request; /* the request number in the step window it was made in, else -1 */
    int planned;     /* 1: a view of the arena */
} Live;

typedef struct {
    uintptr_t ptr;
    int64_t size;
    uintptr_t stream;
} Cached;

typedef struct {
    int64_t kind; /* 1 malloc, 2 free: a row of traced_layout.py's trace */
    int64_t request;
    int64_t size;
    int64_t stream;
} Event;

#define LIVE_SLOTS (1 << 20)
static Live *live;
static Cached *cached;
static int64_t cached_count, cached_capacity;
static Event *events;
static int64_t event_count, event_capacity;

static int mode = MODE_OFF;
static int throw_when_full;
static int64_t next_request;
static const int64_t *plan_size, *plan_offset, *plan_stream;
static int64_t plan_count;
static uintptr_t arena;
static int64_t arena_bytes;

static int64_t live_count;
static int64_t live_bytes, peak_live_bytes, fallback_reserved_bytes, peak_reserved_bytes;
static int64_t planned_count, fallback_count, fallback_bytes, mismatch_count, overlap_count;


static int grow(void **array, int64_t *capacity, int64_t need, size_t item) {
    if (need <= *capacity) return 1;
    int64_t capacity_new = *capacity ? *capacity * 2 : 1024;
    while (capacity_new < need) capacity_new *= 2;
    void *bigger = realloc(*array, (size_t)capacity_new * item);
    if (!bigger) return 0;
    *array = bigger;
    *capacity = capacity_new;
    return 1;
}

static uint64_t slot_of(uintptr_t ptr) { return ((uint64_t)ptr * 0x9E3779B97F4A7C15ull) >> 44; }

static void live_put(Live entry) {
    uint64_t slot = slot_of(entry.ptr);
    while (live[slot].ptr) slot = (slot + 1) & (LIVE_SLOTS - 1);
    live[slot] = entry;
}

static int live_take(uintptr_t ptr, Live *out) {
    uint64_t slot = slot_of(ptr);
    while (live[slot].ptr && live[slot].ptr != ptr) slot = (slot + 1) & (LIVE_SLOTS - 1);
    if (!live[slot].ptr) return 0;
    *out = live[slot];
    live[slot].ptr = 0;
    /* Backward-shift deletion: later entries of the probe run move up so lookups never stop early. */
    uint64_t hole = slot, next = (slot + 1) & (LIVE_SLOTS - 1);
    while (live[next].ptr) {
        uint64_t home = slot_of(live[next].ptr);
        if (((next - home) & (LIVE_SLOTS - 1)) >= ((next - hole) & (LIVE_SLOTS - 1))) {
            live[hole] = live[next];
            live[next].ptr = 0;
            hole = next;
        }
        next = (next + 1) & (LIVE_SLOTS - 1);
    }
    return 1;
}

static int64_t rounded(int64_t size) {
    int64_t unit = size <= (1 << 20) ? 512 : (2 << 20);
    return (size + unit - 1) / unit * unit;
}

static void note_reserved(void) {
    int64_t reserved = fallback_reserved_bytes + arena_bytes;
    if (reserved > peak_reserved_bytes) peak_reserved_bytes = reserved;
}

static void release_cached(void) {
    if (cached_count && backend_sync) backend_sync();
    for (int64_t i = 0; i < cached_count; i++) {
        backend_free((void *)cached[i].ptr);
        fallback_reserved_bytes -= cached[i].size;
    }
    cached_count = 0;
}

static void *fallback_malloc(int64_t size, uintptr_t stream) {
    int64_t block = rounded(size);
    for (int64_t i = cached_count - 1; i >= 0; i--) {
        if (cached[i].size == block && cached[i].stream == stream) {
            void *ptr = (void *)cached[i].ptr;
            cached[i] = cached[--cached_count];
            return ptr;
        }
    }
    void *ptr = NULL;
    if (backend_malloc(&ptr, (size_t)block) != 0 || !ptr) {
        release_cached(); /* like the caching allocator: return the cache, then try once more */
        ptr = NULL;
        if (backend_malloc(&ptr, (size_t)block) != 0 || !ptr) return NULL;
    }
    fallback_reserved_bytes += block;
    note_reserved();
    return ptr;
}

static void fallback_free(uintptr_t ptr, int64_t size, uintptr_t stream) {
    if (!grow((void **)&cached, &cached_capacity, cached_count + 1, sizeof(Cached))) {
        backend_free((void *)ptr);
        fallback_reserved_bytes -= rounded(size);
        return;
    }
    cached[cached_count++] = (Cached){ptr, rounded(size), stream};
}

static int slot_is_free(int64_t offset, int64_t size) {
    auto next = held.lower_bound(offset); /* the first held block at or above the slot */
    if (next != held.end() && next->first < offset + size) return 0;
    if (next != held.begin() && std::prev(next)->first + std::prev(next)->second > offset) return 0;
    return 1;
}

static int hold(int64_t offset, int64_t size) {
    try {
        held.emplace(offset, size);
        return 1;
    } catch (const std::bad_alloc &) {
        return 0; /* no host memory to track it: the request goes to the cache */
    }
}

static void record(int64_t kind, int64_t request, int64_t size, uintptr_t stream) {
    if (grow((void **)&events, &event_capacity, event_count + 1, sizeof(Event)))
        events[event_count++] = (Event){kind, request, size, (int64_t)stream};
}

void *replay_malloc(size_t size_unsigned, int device, void *stream_ptr) {
    (void)device;
    int64_t size = (int64_t)size_unsigned;
    uintptr_t stream = (uintptr_t)stream_ptr;
    if (size <= 0) return NULL;
    pthread_mutex_lock(&lock);
    int64_t request = mode == MODE_OFF ? -1 : next_request++;
    void *ptr = NULL;
    int planned = 0;
    int table_full = live_count >= LIVE_SLOTS / 2; /* as good as out of memory: no block can be tracked */
    if (!table_full && mode == MODE_REPLAY && request < plan_count && plan_offset[request] >= 0) {
        if (plan_size[request] != size || plan_stream[request] != (int64_t)stream) {
            mismatch_count++;
        } else if (!slot_is_free(plan_offset[request], size)) {
            overlap_count++;
        } else if (hold(plan_offset[request], size)) {
            ptr = (void *)(arena + (uintptr_t)plan_offset[request]);
            planned = 1;
            planned_count++;
        }
        if (!planned) {
            fallback_count++;
            fallback_bytes += size;
        }
    }
    if (!planned && !table_full) ptr = fallback_malloc(size, stream);
    if (ptr) {
        live_put((Live){(uintptr_t)ptr, size, request, planned});
        live_count++;
        live_bytes += size;
        if (live_bytes > peak_live_bytes) peak_live_bytes = live_bytes;
        if (mode == MODE_TRACE) record(1, request, size, stream);
    }
    int64_t reserved = fallback_reserved_bytes + arena_bytes, in_use = live_bytes;
    pthread_mutex_unlock(&lock);
    if (!ptr && throw_when_full) {
        char message[200];
        snprintf(message, sizeof(message),
                 "CUDA out of memory (replay allocator): tried to allocate %.2f GiB with %.2f GiB reserved, %.2f GiB "
                 "in use", size / 1073741824.0, reserved / 1073741824.0, in_use / 1073741824.0);
        throw std::runtime_error(message);
    }
    return ptr;
}

void replay_free(void *ptr, size_t size, int device, void *stream) {
    (void)size;
    (void)device;
    pthread_mutex_lock(&lock);
    Live entry;
    if (live_take((uintptr_t)ptr, &entry)) {
        live_count--;
        live_bytes -= entry.size;
        if (mode == MODE_TRACE) record(2, entry.request, entry.size, (uintptr_t)stream);
        if (entry.planned) {
            int64_t offset = (int64_t)((uintptr_t)ptr - arena);
            auto block = held.find(offset);
            if (block != held.end() && block->second == entry.size) held.erase(block);
        } else {
            fallback_free((uintptr_t)ptr, entry.size, (uintptr_t)stream);
        }
    }
    pthread_mutex_unlock(&lock);
}

/* ---- control, from Python through ctypes ---- */

/* The device's functions, and whether a request that finds no memory throws (under PyTorch) or returns NULL
 * (driven through ctypes, where an exception could not be caught). */
int replay_set_backend(void *malloc_fn, void *free_fn, void *sync_fn, int throw_on_full) {
    backend_malloc = (device_malloc_fn)malloc_fn;
    backend_free = (device_free_fn)free_fn;
    backend_sync = (device_sync_fn)sync_fn;
    throw_when_full = throw_on_full;
    if (!live) live = (Live *)calloc(LIVE_SLOTS, sizeof(Live));
    return live ? 0 : -1;
}

/* Start a step window: requests are numbered from 0; trace (1) records them, replay (2) serves the plan. */
void replay_begin(int window_mode) {
    pthread_mutex_lock(&lock);
    mode = window_mode;
    next_request = 0;
    if (mode == MODE_TRACE) event_count = 0;
    pthread_mutex_unlock(&lock);
}

void replay_end(void) {
    pthread_mutex_lock(&lock);
    mode = MODE_OFF;
    pthread_mutex_unlock(&lock);
}

int64_t replay_event_count(void) { return event_count; }

/* Copy the trace out as rows of (kind, request, size, stream). */
void replay_events(int64_t *out) { memcpy(out, events, (size_t)event_count * sizeof(Event)); }

/* The plan: for request i, its size, stream and arena offset (-1: not planned). The arrays stay owned by the
 * caller and must outlive the replay. The arena is reserved here (the cache returned first). */
int replay_set_plan(const int64_t *sizes, const int64_t *offsets, const int64_t *streams, int64_t count,
                    int64_t bytes) {
    pthread_mutex_lock(&lock);
    int status = 0;
    if (!held.empty()) {
        status = -2; /* tensors of the old arena are still alive */
    } else {
        release_cached();
        if (arena) {
            if (backend_sync) backend_sync();
            backend_free((void *)arena);
            arena = 0;
            arena_bytes = 0;
        }
        void *ptr = NULL;
        if (bytes > 0 && (backend_malloc(&ptr, (size_t)bytes) != 0 || !ptr)) {
            status = -1;
            count = 0;
        } else {
            arena = (uintptr_t)ptr;
            arena_bytes = bytes > 0 ? bytes : 0;
        }
        plan_size = sizes;
        plan_offset = offsets;
        plan_stream = streams;
        plan_count = count;
        note_reserved();
    }
    pthread_mutex_unlock(&lock);
    return status;
}

/* Return the fallback's free blocks to the device (what torch.cuda.empty_cache does for the caching one). */
void replay_release_cache(void) {
    pthread_mutex_lock(&lock);
    release_cached();
    pthread_mutex_unlock(&lock);
}

void replay_reset_peaks(void) {
    pthread_mutex_lock(&lock);
    peak_live_bytes = live_bytes;
    peak_reserved_bytes = fallback_reserved_bytes + arena_bytes;
    pthread_mutex_unlock(&lock);
}

/* Counters: live, peak live, reserved (fallback blocks + arena), peak reserved, arena bytes, planned requests,
 * fallbacks, their bytes, size/stream mismatches, slots refused as still held. */
void replay_stats(int64_t *out) {
    pthread_mutex_lock(&lock);
    int64_t values[10] = {live_bytes, peak_live_bytes, fallback_reserved_bytes + arena_bytes, peak_reserved_bytes,
                          arena_bytes, planned_count, fallback_count, fallback_bytes, mismatch_count,
                          overlap_count};
    memcpy(out, values, sizeof(values));
    pthread_mutex_unlock(&lock);
}

}  // extern "C"
