/*
 * A fake libnvidia-ml.so.1 for tests on machines without NVIDIA GPUs. It exports the NVML
 * entry points caisson's inventory reaches through nvml-wrapper, with the real ABI, and
 * describes FAKE_NVML_GPUS (default 3, at most 8) GPUs: index i has UUID
 * GPU-fa4e0000-0000-0000-0000-00000000000i, minor number FAKE_NVML_MINOR_BASE + i (default 0),
 * (i + 1) * 16 GiB of memory and PCI bus id 00000000:0i:00.0.
 * FAKE_NVML_INIT_FAIL=1 makes nvmlInit fail as without a driver (NVML_ERROR_DRIVER_NOT_LOADED).
 * FAKE_NVML_MIG="0:2,2:0" turns MIG mode on for GPUs 0 and 2, with 2 and 0 MIG devices: MIG
 * device j of GPU i has UUID MIG-fa4e0000-0000-0000-000i-00000000000j, the name
 * "Fake NVIDIA GPU i MIG <j+1>g.<(j+1)*10>gb" and (j+1) * 10 GiB of memory. Other GPUs do not
 * support MIG (NVML_ERROR_NOT_SUPPORTED), as most GPUs.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
};

/* A GPU (parent NULL) or a MIG device of `parent` (index = its MIG index). */
struct fake_device { unsigned int index; struct fake_device *parent; };
typedef struct fake_device *nvmlDevice_t;

typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;

typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

#define MAX_GPUS 8
#define MAX_MIG 7
static struct fake_device devices[MAX_GPUS];
static struct fake_device mig_devices[MAX_GPUS][MAX_MIG];
static int initialized;

static unsigned int env_uint(const char *name, unsigned int def) {
    const char *v = getenv(name);
    return v && *v ? (unsigned int)strtoul(v, NULL, 10) : def;
}

static unsigned int gpu_count(void) {
    unsigned int n = env_uint("FAKE_NVML_GPUS", 3);
    return n > MAX_GPUS ? MAX_GPUS : n;
}

/* MIG devices of GPU `gpu` from FAKE_NVML_MIG, or -1 when MIG is not supported there. */
static int mig_count(unsigned int gpu) {
    const char *v = getenv("FAKE_NVML_MIG");
    while (v && *v) {
        char *end;
        unsigned long g = strtoul(v, &end, 10);
        if (*end != ':') return -1;
        unsigned long n = strtoul(end + 1, &end, 10);
        if (g == gpu) return n > MAX_MIG ? MAX_MIG : (int)n;
        v = *end == ',' ? end + 1 : NULL;
    }
    return -1;
}

static int is_gpu(nvmlDevice_t d) {
    return initialized > 0 && d >= devices && d < devices + gpu_count();
}

static int is_mig(nvmlDevice_t d) {
    if (initialized <= 0 || d < &mig_devices[0][0] || d >= &mig_devices[0][0] + MAX_GPUS * MAX_MIG)
        return 0;
    return is_gpu(d->parent) && (int)d->index < mig_count(d->parent->index);
}

static int valid(nvmlDevice_t d) {
    return is_gpu(d) || is_mig(d);
}

static nvmlReturn_t copy_str(char *dst, unsigned int len, const char *src) {
    if (!dst) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > len) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(dst, src);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) {
    if (env_uint("FAKE_NVML_INIT_FAIL", 0)) return NVML_ERROR_DRIVER_NOT_LOADED;
    for (unsigned int i = 0; i < MAX_GPUS; i++) {
        devices[i].index = i;
        devices[i].parent = NULL;
        for (unsigned int j = 0; j < MAX_MIG; j++) {
            mig_devices[i][j].index = j;
            mig_devices[i][j].parent = &devices[i];
        }
    }
    initialized++;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    return nvmlInit_v2();
}

nvmlReturn_t nvmlShutdown(void) {
    if (initialized <= 0) return NVML_ERROR_UNINITIALIZED;
    initialized--;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int len) {
    if (initialized <= 0) return NVML_ERROR_UNINITIALIZED;
    return copy_str(version, len, "550.00.fake");
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (initialized <= 0) return NVML_ERROR_UNINITIALIZED;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = gpu_count();
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (initialized <= 0) return NVML_ERROR_UNINITIALIZED;
    if (!device || index >= gpu_count()) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &devices[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t d, unsigned int *index) {
    if (!is_gpu(d) || !index) return NVML_ERROR_INVALID_ARGUMENT;
    *index = d->index;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int len) {
    char buf[96];
    if (!valid(d)) return NVML_ERROR_INVALID_ARGUMENT;
    if (d->parent)
        snprintf(buf, sizeof buf, "MIG-fa4e0000-0000-0000-%04u-%012u", d->parent->index, d->index);
    else
        snprintf(buf, sizeof buf, "GPU-fa4e0000-0000-0000-0000-%012u", d->index);
    return copy_str(uuid, len, buf);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int len) {
    char buf[96];
    if (!valid(d)) return NVML_ERROR_INVALID_ARGUMENT;
    if (d->parent)
        snprintf(buf, sizeof buf, "Fake NVIDIA GPU %u MIG %ug.%ugb", d->parent->index,
                 d->index + 1, (d->index + 1) * 10);
    else
        snprintf(buf, sizeof buf, "Fake NVIDIA GPU %u", d->index);
    return copy_str(name, len, buf);
}

/* Total memory: (i + 1) * 16 GiB for GPU i, (j + 1) * 10 GiB for MIG device j. */
static unsigned long long total_memory(nvmlDevice_t d) {
    if (d->parent) return (unsigned long long)(d->index + 1) * 10 << 30;
    return (unsigned long long)(d->index + 1) << 34;
}

nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t d, unsigned int *minor) {
    if (is_mig(d)) return NVML_ERROR_NOT_SUPPORTED;
    if (!valid(d) || !minor) return NVML_ERROR_INVALID_ARGUMENT;
    *minor = env_uint("FAKE_NVML_MINOR_BASE", 0) + d->index;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m) {
    if (!valid(d) || !m) return NVML_ERROR_INVALID_ARGUMENT;
    m->total = total_memory(d);
    m->used = 0;
    m->free = m->total;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m) {
    if (!valid(d) || !m) return NVML_ERROR_INVALID_ARGUMENT;
    m->total = total_memory(d);
    m->reserved = 0;
    m->used = 0;
    m->free = m->total;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t d, nvmlPciInfo_t *p) {
    if (!is_gpu(d) || !p) return NVML_ERROR_INVALID_ARGUMENT;
    memset(p, 0, sizeof *p);
    p->domain = 0;
    p->bus = d->index;
    p->device = 0;
    p->pciDeviceId = 0x20b010de;
    p->pciSubSystemId = 0x134f10de;
    snprintf(p->busId, sizeof p->busId, "00000000:%02X:00.0", d->index);
    snprintf(p->busIdLegacy, sizeof p->busIdLegacy, "0000:%02X:00.0", d->index);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t d, unsigned int *current, unsigned int *pending) {
    if (!is_gpu(d) || !current || !pending) return NVML_ERROR_INVALID_ARGUMENT;
    if (mig_count(d->index) < 0) return NVML_ERROR_NOT_SUPPORTED;
    *current = *pending = 1;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t d, unsigned int *count) {
    if (!is_gpu(d) || !count) return NVML_ERROR_INVALID_ARGUMENT;
    if (mig_count(d->index) < 0) return NVML_ERROR_NOT_SUPPORTED;
    *count = MAX_MIG;
    return NVML_SUCCESS;
}

/* As the real one: indexes up to the maximum, the absent ones NVML_ERROR_NOT_FOUND. */
nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t d, unsigned int index,
                                                 nvmlDevice_t *mig) {
    if (!is_gpu(d) || !mig || index >= MAX_MIG) return NVML_ERROR_INVALID_ARGUMENT;
    int n = mig_count(d->index);
    if (n < 0) return NVML_ERROR_NOT_SUPPORTED;
    if ((int)index >= n) return NVML_ERROR_NOT_FOUND;
    *mig = &mig_devices[d->index][index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t d, unsigned int *is) {
    if (!valid(d) || !is) return NVML_ERROR_INVALID_ARGUMENT;
    *is = d->parent != NULL;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t d, nvmlDevice_t *parent) {
    if (!is_mig(d) || !parent) return NVML_ERROR_INVALID_ARGUMENT;
    *parent = d->parent;
    return NVML_SUCCESS;
}
