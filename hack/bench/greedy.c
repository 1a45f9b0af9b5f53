// llama.cpp's greedy continuation of a prompt given as token ids, for the cross-check in
// engine-vs-llamacpp.sh: the same ids into both engines, the same argmax rule (the lowest
// id on ties), the ids out. Linked by that script against the static libraries of
// hack/build-llamacpp.sh's build tree.
//
//   greedy MODEL.gguf THREADS NEW_TOKENS ID,ID,...   -> prints NEW_TOKENS ids, comma-separated
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char *text, void *data) {
    (void)text;
    (void)data;
    if (level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL.gguf THREADS NEW_TOKENS ID,ID,...\n", argv[0]);
        return 2;
    }
    const int threads = atoi(argv[2]);
    const int fresh = atoi(argv[3]);
    const int most = (int)strlen(argv[4]) / 2 + 1;
    if (threads < 1 || fresh < 1) {
        fprintf(stderr, "greedy: THREADS and NEW_TOKENS must be at least 1\n");
        return 2;
    }
    llama_token *ids = malloc(sizeof(llama_token) * (size_t)(most + fresh));
    int n = 0;
    for (char *p = strtok(argv[4], ","); p != NULL; p = strtok(NULL, ",")) {
        char *end = NULL;
        const long id = strtol(p, &end, 10);
        if (*end != '\0' || id < 0) {
            fprintf(stderr, "greedy: %s is not a token id\n", p);
            return 2;
        }
        ids[n++] = (llama_token)id;
    }
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model *model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (model == NULL) {
        fprintf(stderr, "greedy: cannot load %s\n", argv[1]);
        return 1;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)(n + fresh);
    cp.n_batch = (uint32_t)n;
    cp.n_ubatch = (uint32_t)n;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (ctx == NULL) {
        fprintf(stderr, "greedy: cannot create a context\n");
        return 1;
    }
    const int vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    for (int i = 0; i < n; i++) {
        if (ids[i] >= vocab) {
            fprintf(stderr, "greedy: id %d is outside the vocabulary (%d)\n", ids[i], vocab);
            return 2;
        }
    }
    struct llama_batch batch = llama_batch_get_one(ids, n);
    for (int i = 0; i < fresh; i++) {
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "greedy: llama_decode failed at new token %d\n", i);
            return 1;
        }
        const float *logits = llama_get_logits_ith(ctx, -1);
        int best = 0;
        for (int t = 1; t < vocab; t++) {
            if (logits[t] > logits[best]) {
                best = t;
            }
        }
        ids[n + i] = best;
        printf(i == 0 ? "%d" : ",%d", best);
        batch = llama_batch_get_one(&ids[n + i], 1);
    }
    printf("\n");
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    free(ids);
    return 0;
}
