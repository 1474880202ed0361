// AMX tiles for the native kernels: whether this build targets them, and the process's permission to use them.
//
// SPINDLE_HAS_AMX is defined where the compiler targets AMX-BF16 (and AVX512-BF16 for rounding stores); code under it
// may use tiles only after amx_usable() returned true, since Linux grants the tile state per process on request.
#pragma once

#include <cstdint>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define SPINDLE_HAS_AMX 1
#endif

namespace spindle {

// Asks Linux for the tile state once per process; false where this build has no AMX code.
inline bool amx_usable() {
#ifdef SPINDLE_HAS_AMX
    constexpr long kRequestTileState = 0x1023;  // arch_prctl ARCH_REQ_XCOMP_PERM
    constexpr long kTileDataFeature = 18;       // XFEATURE_XTILEDATA
    static const bool granted = syscall(SYS_arch_prctl, kRequestTileState, kTileDataFeature) == 0;
    return granted;
#else
    return false;
#endif
}

#ifdef SPINDLE_HAS_AMX
// The tile configuration (palette 1): rows and bytes per row of each of the 8 tiles; a tile left at 0 is unused.
struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t bytes_per_row[16] = {};
    uint8_t rows[16] = {};

    void set(int tile, int tile_rows, int tile_bytes_per_row) {
        rows[tile] = static_cast<uint8_t>(tile_rows);
        bytes_per_row[tile] = static_cast<uint16_t>(tile_rows ? tile_bytes_per_row : 0);
    }
};
#endif

}  // namespace spindle
