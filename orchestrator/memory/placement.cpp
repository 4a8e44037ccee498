/* Best-fit placement of a traced step's buffers, in the replay allocator's library: the offsets of
 * `spec/placement.py`'s `place_in_order` (the reference, which tests compare this with placement for placement).
 *
 * Why: the reference looks at every placed buffer alive with the new one, so its time grows with the requests times
 * the tensors alive at once; a 4-layer 256K step (~10^4 requests) took seconds in Python and a 32-layer step
 * (~10^5) would take minutes. Here the busy address ranges are kept as merged unions in a segment tree over event
 * indices, and the lowest gap is found by each union in turn moving the candidate past the ranges too close
 * together (a union's too-small gaps are skipped in one pass, not one lookup of every union each), not by looking
 * at every buffer alive with the new one. The planner's arena (a
 * few hundred buffers, on a laptop without a compiler) keeps the Python one.
 *
 * A placed buffer's address range goes into `cover` of the tree nodes its lifetime decomposes into and into `part`
 * of every node on the paths from its first and last event to the root (nodes its lifetime meets). The placed
 * buffers alive with a new one [start, end) are then exactly those in `cover` of the nodes on its own two paths and
 * of its decomposition, and in `part` of its decomposition. A buffer of no lifetime (start == end; never in a
 * trace) is compared with every placed one, as the reference does.
 */

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <new>
#include <utility>
#include <vector>

namespace {

/* Address ranges [low, high) as a union: disjoint, touching ones merged, by low. */
class Union {
  public:
    void add(int64_t low, int64_t high) {
        auto next = ranges_.upper_bound(low);
        if (next != ranges_.begin()) {
            auto before = std::prev(next);
            if (before->second >= low) {
                low = before->first;
                high = std::max(high, before->second);
                ranges_.erase(before);
            }
        }
        while (next != ranges_.end() && next->first <= high) {
            high = std::max(high, next->second);
            next = ranges_.erase(next);
        }
        ranges_.emplace(low, high);
    }

    /* The lowest y >= x where [y, y + size) meets none of these ranges: past every range too close to the next. */
    int64_t first_fit(int64_t x, int64_t size) const {
        auto next = ranges_.upper_bound(x);
        if (next != ranges_.begin() && std::prev(next)->second > x) x = std::prev(next)->second;
        for (; next != ranges_.end() && next->first < x + size; ++next) x = std::max(x, next->second);
        return x;
    }

  private:
    std::map<int64_t, int64_t> ranges_;
};

class PlacedInTime {
  public:
    explicit PlacedInTime(int64_t horizon) {
        while (leaves_ < horizon + 1) leaves_ <<= 1;
        cover_.resize((size_t)(2 * leaves_));
        part_.resize((size_t)(2 * leaves_));
    }

    void add(int64_t start, int64_t end, int64_t low, int64_t high) {
        if (end <= start) {
            points_.push_back({start, {low, high}});
            return;
        }
        for (int64_t node : decomposition(start, end)) at(cover_, node).add(low, high);
        for (int64_t node = start + leaves_; node; node >>= 1) at(part_, node).add(low, high);
        for (int64_t node = end - 1 + leaves_; node; node >>= 1) at(part_, node).add(low, high);
    }

    /* The lowest x >= 0 where [x, x + size) meets no range of a placed buffer alive within [start, end). */
    int64_t lowest_gap(int64_t start, int64_t end, int64_t size) {
        unions_.clear();
        std::vector<int64_t> pieces = decomposition(start, end);
        for (int64_t node : pieces) {
            collect(cover_, node);
            collect(part_, node);
        }
        for (int64_t node = start + leaves_; node; node >>= 1) collect(cover_, node);
        for (int64_t node = end - 1 + leaves_; node; node >>= 1) collect(cover_, node);
        Union points; /* placed buffers of no lifetime at an event inside (start, end) */
        for (const auto &point : points_)
            if (start < point.first && point.first < end) points.add(point.second.first, point.second.second);
        unions_.push_back(&points);
        for (int64_t x = 0;;) { /* each union's first fit from the one before's, until a round moves nothing */
            int64_t y = x;
            for (const Union *u : unions_) y = u->first_fit(y, size);
            if (y == x) return x;
            x = y;
        }
    }

  private:
    std::vector<int64_t> decomposition(int64_t start, int64_t end) const {
        std::vector<int64_t> nodes;
        for (int64_t low = start + leaves_, high = end + leaves_; low < high; low >>= 1, high >>= 1) {
            if (low & 1) nodes.push_back(low++);
            if (high & 1) nodes.push_back(--high);
        }
        return nodes;
    }

    static Union &at(std::vector<std::unique_ptr<Union>> &nodes, int64_t node) {
        auto &slot = nodes[(size_t)node];
        if (!slot) slot.reset(new Union());
        return *slot;
    }

    void collect(const std::vector<std::unique_ptr<Union>> &nodes, int64_t node) {
        if (nodes[(size_t)node]) unions_.push_back(nodes[(size_t)node].get());
    }

    int64_t leaves_ = 1;
    std::vector<std::unique_ptr<Union>> cover_, part_;
    std::vector<std::pair<int64_t, std::pair<int64_t, int64_t>>> points_;
    std::vector<const Union *> unions_;
};

}  // namespace

/* Offsets of the buffers (sizes, [starts, ends) in event indices) placed one at a time in `order`: 0 when done,
 * -1 when host memory ran out. */
extern "C" int replay_place_in_order(int64_t count, const int64_t *sizes, const int64_t *starts, const int64_t *ends,
                                     const int64_t *order, int64_t *offsets) {
    try {
        int64_t horizon = 0;
        for (int64_t i = 0; i < count; i++) horizon = std::max(horizon, ends[i]);
        PlacedInTime placed(horizon);
        std::vector<int64_t> done;
        for (int64_t n = 0; n < count; n++) {
            int64_t i = order[n];
            if (ends[i] <= starts[i]) { /* no lifetime: every placed buffer alive around its event */
                Union busy;
                for (int64_t j : done)
                    if (starts[i] < ends[j] && starts[j] < ends[i]) busy.add(offsets[j], offsets[j] + sizes[j]);
                offsets[i] = busy.first_fit(0, sizes[i]);
            } else {
                offsets[i] = placed.lowest_gap(starts[i], ends[i], sizes[i]);
            }
            placed.add(starts[i], ends[i], offsets[i], offsets[i] + sizes[i]);
            done.push_back(i);
        }
        return 0;
    } catch (const std::bad_alloc &) {
        return -1;
    }
}
