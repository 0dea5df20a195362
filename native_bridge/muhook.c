/*
 * muhook.c - MU-LLaMA injection hook for llama.cpp's eval callback (cb_eval).
 *
 * For every injected layer l the music adapter produces one constant vector d_l (n_embd floats)
 * that must be added to every row of the graph node "attn_out-<l>" (after wo and its bias,
 * before the residual add). llama.cpp calls the eval callback for every graph node:
 *   ask == true : "do you want to see this node?"  -> true only for attn_out-<l> with a vector;
 *   ask == false: the node has been computed        -> add d_l in place; returning false would
 *                                                      abort the graph, so we always return true.
 *
 * One muhook_state per llama_context (passed as cb_eval_user_data); no global state.
 * Not thread safe: configure the state between llama_decode calls, never during one.
 *
 * Rows and clips: either one clip for every row (muhook_use_clip), or a row -> clip map for the
 * whole llama_batch of the next llama_decode (muhook_set_row_clips). The callback only sees one
 * ubatch at a time, so the state tracks where the current ubatch starts in the batch: a hooked
 * layer whose index is <= the last hooked layer seen starts a new graph run (= a new ubatch), and
 * the row base moves forward by the previous ubatch's row count. This requires the ubatches to be
 * in-order slices of the batch (llama.cpp's split_simple: kv_unified = true or n_seq_max = 1).
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"
#include "ggml-backend.h"

#if defined(_WIN32)
#define MUHOOK_API __declspec(dllexport)
#else
#define MUHOOK_API __attribute__((visibility("default")))
#endif

/* Bump when any exported signature or struct below changes (checked from Python at load). */
#define MUHOOK_ABI_VERSION 1
#define MUHOOK_MAX_CLIPS (1 << 16)

static const char MUHOOK_PREFIX[] = "attn_out-";
#define MUHOOK_PREFIX_LEN (sizeof(MUHOOK_PREFIX) - 1)

/* Error codes returned by the setters. */
enum { MUHOOK_OK = 0, MUHOOK_EINVAL = -1, MUHOOK_ENOMEM = -2 };

struct muhook_counters {
    uint64_t ask_calls;      /* every ask == true call (one per graph node) */
    uint64_t ask_accepted;   /* ask calls answered true */
    uint64_t eval_calls;     /* ask == false calls */
    uint64_t injected_rows;  /* rows that received a vector */
    uint64_t unmapped_rows;  /* rows past the end of the row map (not injected) */
    uint64_t skipped_nodes;  /* accepted names whose type/shape did not fit (not injected) */
    uint64_t device_rows;    /* injected rows that went through ggml_backend_tensor_get/set */
    uint64_t ubatches;       /* graph runs that reached a hooked layer */
};

struct muhook_clip {
    float **layer; /* n_layer pointers, NULL = no vector for that layer */
};

struct muhook_state {
    int n_embd;
    int n_layer;
    int n_clips;
    struct muhook_clip *clips;
    int *layer_users;      /* per layer: number of clips with a vector there */
    int active_clip;       /* single-clip mode; -1 = none */
    int32_t *row_clip;     /* row-map mode when non-NULL */
    int64_t n_rows;
    int64_t row_base;      /* first batch row of the current ubatch */
    int64_t ubatch_rows;   /* rows of the current ubatch */
    int last_layer;        /* last hooked layer seen, -1 before the first */
    float *scratch;        /* n_embd floats for device buffers */
    struct muhook_counters counters;
};

MUHOOK_API int muhook_abi_version(void) { return MUHOOK_ABI_VERSION; }
MUHOOK_API size_t muhook_sizeof_tensor(void) { return sizeof(struct ggml_tensor); }
MUHOOK_API size_t muhook_sizeof_counters(void) { return sizeof(struct muhook_counters); }

/* Offsets of the ggml_tensor fields the Python mirror reads: type, buffer, ne, nb, data, name. */
MUHOOK_API int muhook_tensor_offsets(size_t *out, int n) {
    const size_t offs[6] = {
        offsetof(struct ggml_tensor, type), offsetof(struct ggml_tensor, buffer),
        offsetof(struct ggml_tensor, ne),   offsetof(struct ggml_tensor, nb),
        offsetof(struct ggml_tensor, data), offsetof(struct ggml_tensor, name),
    };
    for (int i = 0; i < n && i < 6; i++) out[i] = offs[i];
    return 6;
}

MUHOOK_API struct muhook_state *muhook_new(int n_embd, int n_layer) {
    if (n_embd <= 0 || n_layer <= 0) return NULL;
    struct muhook_state *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    s->n_embd = n_embd;
    s->n_layer = n_layer;
    s->active_clip = -1;
    s->last_layer = -1;
    s->layer_users = calloc((size_t)n_layer, sizeof(int));
    s->scratch = malloc((size_t)n_embd * sizeof(float));
    if (!s->layer_users || !s->scratch) {
        free(s->layer_users);
        free(s->scratch);
        free(s);
        return NULL;
    }
    return s;
}

static void clip_free(struct muhook_state *s, struct muhook_clip *c) {
    if (!c->layer) return;
    for (int l = 0; l < s->n_layer; l++) {
        if (c->layer[l]) s->layer_users[l]--;
        free(c->layer[l]);
    }
    free(c->layer);
    c->layer = NULL;
}

MUHOOK_API void muhook_free(struct muhook_state *s) {
    if (!s) return;
    for (int c = 0; c < s->n_clips; c++) clip_free(s, &s->clips[c]);
    free(s->clips);
    free(s->layer_users);
    free(s->row_clip);
    free(s->scratch);
    free(s);
}

static void reset_rows(struct muhook_state *s) {
    s->row_base = 0;
    s->ubatch_rows = 0;
    s->last_layer = -1;
}

MUHOOK_API int muhook_set_n_clips(struct muhook_state *s, int n_clips) {
    if (!s || n_clips < 0 || n_clips > MUHOOK_MAX_CLIPS) return MUHOOK_EINVAL;
    if (n_clips <= s->n_clips) return MUHOOK_OK; /* never shrinks: clips may be in use */
    struct muhook_clip *p = realloc(s->clips, (size_t)n_clips * sizeof(*p));
    if (!p) return MUHOOK_ENOMEM;
    memset(p + s->n_clips, 0, (size_t)(n_clips - s->n_clips) * sizeof(*p));
    s->clips = p;
    s->n_clips = n_clips;
    return MUHOOK_OK;
}

MUHOOK_API int muhook_n_clips(const struct muhook_state *s) { return s ? s->n_clips : 0; }

/* Copies d (n_embd floats) as clip's vector for layer; d == NULL removes it. */
MUHOOK_API int muhook_set_vector(struct muhook_state *s, int clip, int layer, const float *d) {
    if (!s || clip < 0 || layer < 0 || layer >= s->n_layer) return MUHOOK_EINVAL;
    if (clip >= s->n_clips) {
        if (!d) return MUHOOK_OK;
        int rc = muhook_set_n_clips(s, clip + 1);
        if (rc != MUHOOK_OK) return rc;
    }
    struct muhook_clip *c = &s->clips[clip];
    if (!d) {
        if (c->layer && c->layer[layer]) {
            free(c->layer[layer]);
            c->layer[layer] = NULL;
            s->layer_users[layer]--;
        }
        return MUHOOK_OK;
    }
    if (!c->layer) {
        c->layer = calloc((size_t)s->n_layer, sizeof(float *));
        if (!c->layer) return MUHOOK_ENOMEM;
    }
    if (!c->layer[layer]) {
        c->layer[layer] = malloc((size_t)s->n_embd * sizeof(float));
        if (!c->layer[layer]) return MUHOOK_ENOMEM;
        s->layer_users[layer]++;
    }
    memcpy(c->layer[layer], d, (size_t)s->n_embd * sizeof(float));
    return MUHOOK_OK;
}

/* Removes every vector of clip (the clip number stays valid). */
MUHOOK_API int muhook_clear_clip(struct muhook_state *s, int clip) {
    if (!s || clip < 0) return MUHOOK_EINVAL;
    if (clip < s->n_clips) clip_free(s, &s->clips[clip]);
    return MUHOOK_OK;
}

/* No injection until muhook_use_clip or muhook_set_row_clips. Stored vectors are kept. */
MUHOOK_API void muhook_clear(struct muhook_state *s) {
    if (!s) return;
    s->active_clip = -1;
    free(s->row_clip);
    s->row_clip = NULL;
    s->n_rows = 0;
    reset_rows(s);
}

MUHOOK_API int muhook_use_clip(struct muhook_state *s, int clip) {
    if (!s || clip < -1 || clip >= s->n_clips) return MUHOOK_EINVAL;
    muhook_clear(s);
    s->active_clip = clip;
    return MUHOOK_OK;
}

/* Row -> clip map (-1 = no injection) for the whole batch of the next llama_decode. */
MUHOOK_API int muhook_set_row_clips(struct muhook_state *s, const int32_t *row_clip, int n_rows) {
    if (!s || n_rows < 0 || (n_rows > 0 && !row_clip)) return MUHOOK_EINVAL;
    for (int i = 0; i < n_rows; i++)
        if (row_clip[i] < -1 || row_clip[i] >= s->n_clips) return MUHOOK_EINVAL;
    int32_t *copy = malloc((size_t)(n_rows > 0 ? n_rows : 1) * sizeof(int32_t));
    if (!copy) return MUHOOK_ENOMEM;
    if (n_rows > 0) memcpy(copy, row_clip, (size_t)n_rows * sizeof(int32_t));
    muhook_clear(s);
    s->row_clip = copy;
    s->n_rows = n_rows;
    return MUHOOK_OK;
}

MUHOOK_API void muhook_get_counters(const struct muhook_state *s, struct muhook_counters *out) {
    if (s && out) *out = s->counters;
}

MUHOOK_API void muhook_reset_counters(struct muhook_state *s) {
    if (s) memset(&s->counters, 0, sizeof(s->counters));
}

/* "attn_out-<digits>" exactly -> layer index, else -1. */
static int parse_layer(const char *name, int n_layer) {
    if (memcmp(name, MUHOOK_PREFIX, MUHOOK_PREFIX_LEN) != 0) return -1;
    const char *p = name + MUHOOK_PREFIX_LEN;
    if (*p < '0' || *p > '9') return -1;
    int l = 0;
    for (; *p >= '0' && *p <= '9'; p++) {
        l = l * 10 + (*p - '0');
        if (l >= n_layer) return -1;
    }
    return *p == '\0' ? l : -1;
}

static const float *vector_for(const struct muhook_state *s, int clip, int layer) {
    if (clip < 0 || clip >= s->n_clips || !s->clips[clip].layer) return NULL;
    return s->clips[clip].layer[layer];
}

static bool wants_layer(const struct muhook_state *s, int layer) {
    if (s->row_clip) return s->layer_users[layer] > 0;
    return vector_for(s, s->active_clip, layer) != NULL;
}

static void add_row(struct muhook_state *s, struct ggml_tensor *t, size_t offs, const float *d) {
    const int n = s->n_embd;
    if (t->buffer && !ggml_backend_buffer_is_host(t->buffer)) {
        /* Device buffer (CUDA, Metal, Vulkan...): copy the row out, add, copy back. Written to the
         * documented ggml-backend API but NOT tested: no GPU was available when this was written. */
        ggml_backend_tensor_get(t, s->scratch, offs, (size_t)n * sizeof(float));
        for (int i = 0; i < n; i++) s->scratch[i] += d[i];
        ggml_backend_tensor_set(t, s->scratch, offs, (size_t)n * sizeof(float));
        s->counters.device_rows++;
        return;
    }
    float *row = (float *)((char *)t->data + offs);
    for (int i = 0; i < n; i++) row[i] += d[i];
}

MUHOOK_API bool muhook_cb(struct ggml_tensor *t, bool ask, void *user_data) {
    struct muhook_state *s = user_data;
    if (ask) {
        s->counters.ask_calls++;
        int l = parse_layer(t->name, s->n_layer);
        bool want = l >= 0 && t->type == GGML_TYPE_F32 && t->ne[0] == s->n_embd && wants_layer(s, l);
        s->counters.ask_accepted += want;
        return want;
    }
    s->counters.eval_calls++;
    int l = parse_layer(t->name, s->n_layer);
    /* rows must be contiguous floats (nb[0] == 4): true for attn_out (MUL_MAT / ADD result) */
    if (l < 0 || t->type != GGML_TYPE_F32 || t->ne[0] != s->n_embd || t->nb[0] != sizeof(float) ||
        (!t->data && !t->buffer)) {
        s->counters.skipped_nodes++;
        return true;
    }
    const int64_t n_rows = t->ne[1] * t->ne[2] * t->ne[3];
    if (l <= s->last_layer) { /* first hooked layer of a new graph run = next ubatch */
        s->row_base += s->ubatch_rows;
        s->counters.ubatches++;
    } else if (s->last_layer < 0) {
        s->counters.ubatches++;
    }
    s->last_layer = l;
    s->ubatch_rows = n_rows;

    int64_t r = 0;
    for (int64_t i3 = 0; i3 < t->ne[3]; i3++) {
        for (int64_t i2 = 0; i2 < t->ne[2]; i2++) {
            for (int64_t i1 = 0; i1 < t->ne[1]; i1++, r++) {
                int clip = s->active_clip;
                if (s->row_clip) {
                    int64_t br = s->row_base + r;
                    if (br >= s->n_rows) {
                        s->counters.unmapped_rows++;
                        continue;
                    }
                    clip = s->row_clip[br];
                }
                const float *d = vector_for(s, clip, l);
                if (!d) continue;
                add_row(s, t, (size_t)(i1 * t->nb[1] + i2 * t->nb[2] + i3 * t->nb[3]), d);
                s->counters.injected_rows++;
            }
        }
    }
    return true;
}
