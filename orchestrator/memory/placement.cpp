/* Best-fit placement of a traced step's buffers, in the replay allocator's library: `spec/placement.py`'s
 * `place_in_order` (the reference, which tests compare this with placement for placement) in C++.
 *
 * Why: the placement looks at every placed buffer alive with the new one, so its time grows with the requests times
 * the tensors alive at once. A 4-layer 256K step (~10^4 requests) took seconds in Python, a 32-layer step (~10^5)
 * would take minutes; here it takes about a second. The planner's arena (a few hundred buffers, on a laptop without
 * a compiler) keeps the Python one.
 *
 * Same steps as the reference: buffers in the given order; the placed ones alive with a buffer are those whose
 * lifetime holds its start (a segment tree over event indices, each lifetime at O(log T) nodes) and those starting
 * within its life (sorted by start); the buffer goes at the lowest gap among their address ranges.
 */

#include <algorithm>
#include <cstdint>
#include <new>
#include <utility>
#include <vector>

typedef std::pair<int64_t, int64_t> Span; /* [low, high) bytes */

extern "C" int replay_place_in_order(int64_t count, const int64_t *sizes, const int64_t *starts, const int64_t *ends,
                                     const int64_t *order, int64_t *offsets) {
    try {
        int64_t horizon = 0;
        for (int64_t i = 0; i < count; i++) horizon = std::max(horizon, ends[i]);
        int64_t leaves = 1;
        while (leaves < horizon + 1) leaves <<= 1;
        std::vector<std::vector<Span>> nodes((size_t)(2 * leaves));
        std::vector<std::pair<int64_t, Span>> by_start; /* (start, span) of the placed, sorted by start */
        std::vector<int64_t> placed;
        std::vector<Span> busy;
        auto start_before = [](const std::pair<int64_t, Span> &a, int64_t t) { return a.first < t; };
        auto start_after = [](int64_t t, const std::pair<int64_t, Span> &a) { return t < a.first; };
        for (int64_t n = 0; n < count; n++) {
            int64_t i = order[n], start = starts[i], end = ends[i], size = sizes[i];
            busy.clear();
            if (end <= start) { /* no lifetime (rare): every placed buffer tested */
                for (int64_t j : placed)
                    if (start < ends[j] && starts[j] < end) busy.push_back(Span(offsets[j], offsets[j] + sizes[j]));
            } else {
                for (int64_t node = start + leaves; node; node >>= 1)
                    busy.insert(busy.end(), nodes[(size_t)node].begin(), nodes[(size_t)node].end());
                auto first = std::upper_bound(by_start.begin(), by_start.end(), start, start_after);
                auto last = std::lower_bound(by_start.begin(), by_start.end(), end, start_before);
                for (auto it = first; it < last; ++it) busy.push_back(it->second);
            }
            std::sort(busy.begin(), busy.end());
            int64_t candidate = 0;
            for (const Span &span : busy) {
                if (candidate + size <= span.first) break;
                candidate = std::max(candidate, span.second);
            }
            offsets[i] = candidate;
            Span span(candidate, candidate + size);
            for (int64_t low = start + leaves, high = end + leaves; low < high; low >>= 1, high >>= 1) {
                if (low & 1) nodes[(size_t)low++].push_back(span);
                if (high & 1) nodes[(size_t)--high].push_back(span);
            }
            by_start.insert(std::upper_bound(by_start.begin(), by_start.end(), start, start_after),
                            std::make_pair(start, span));
            placed.push_back(i);
        }
        return 0;
    } catch (const std::bad_alloc &) {
        return -1;
    }
}
