/*
 * A fake libnvidia-ml.so.1 for tests on machines without NVIDIA GPUs. It exports the NVML
 * entry points caisson's inventory reaches through nvml-wrapper, with the real ABI, and
 * describes FAKE_NVML_GPUS (default 3, at most 8) GPUs: index i has UUID
 * GPU-fa4e0000-0000-0000-0000-00000000000i, minor number FAKE_NVML_MINOR_BASE + i (default 0),
 * (i + 1) * 16 GiB of memory and PCI bus id 00000000:0i:00.0.
 * FAKE_NVML_INIT_FAIL=1 makes nvmlInit fail as without a driver (NVML_ERROR_DRIVER_NOT_LOADED).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
};

struct fake_device { unsigned int index; };
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
static struct fake_device devices[MAX_GPUS];
static int initialized;

static unsigned int env_uint(const char *name, unsigned int def) {
    const char *v = getenv(name);
    return v && *v ? (unsigned int)strtoul(v, NULL, 10) : def;
}

static unsigned int gpu_count(void) {
    unsigned int n = env_uint("FAKE_NVML_GPUS", 3);
    return n > MAX_GPUS ? MAX_GPUS : n;
}

static int valid(nvmlDevice_t d) {
    return initialized > 0 && d >= devices && d < devices + gpu_count();
}

static nvmlReturn_t copy_str(char *dst, unsigned int len, const char *src) {
    if (!dst) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > len) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(dst, src);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) {
    if (env_uint("FAKE_NVML_INIT_FAIL", 0)) return NVML_ERROR_DRIVER_NOT_LOADED;
    for (unsigned int i = 0; i < MAX_GPUS; i++) devices[i].index = i;
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
    if (!valid(d) || !index) return NVML_ERROR_INVALID_ARGUMENT;
    *index = d->index;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int len) {
    char buf[96];
    if (!valid(d)) return NVML_ERROR_INVALID_ARGUMENT;
    snprintf(buf, sizeof buf, "GPU-fa4e0000-0000-0000-0000-%012u", d->index);
    return copy_str(uuid, len, buf);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int len) {
    char buf[96];
    if (!valid(d)) return NVML_ERROR_INVALID_ARGUMENT;
    snprintf(buf, sizeof buf, "Fake NVIDIA GPU %u", d->index);
    return copy_str(name, len, buf);
}

nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t d, unsigned int *minor) {
    if (!valid(d) || !minor) return NVML_ERROR_INVALID_ARGUMENT;
    *minor = env_uint("FAKE_NVML_MINOR_BASE", 0) + d->index;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m) {
    if (!valid(d) || !m) return NVML_ERROR_INVALID_ARGUMENT;
    m->total = (unsigned long long)(d->index + 1) << 34;
    m->used = 0;
    m->free = m->total;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m) {
    if (!valid(d) || !m) return NVML_ERROR_INVALID_ARGUMENT;
    m->total = (unsigned long long)(d->index + 1) << 34;
    m->reserved = 0;
    m->used = 0;
    m->free = m->total;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t d, nvmlPciInfo_t *p) {
    if (!valid(d) || !p) return NVML_ERROR_INVALID_ARGUMENT;
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
