/*
 * keav-interop: a thin C shim around one bzrtp endpoint (one ZRTP context,
 * one channel), so the Rust side never touches bzrtp's structures or
 * callbacks directly.
 *
 * The shim owns:
 *   - the bzrtp context and its single channel (identified by an SSRC),
 *   - the sqlite3 handle of the ZID cache (or none when running cacheless),
 *   - a FIFO of outgoing packets filled by bzrtp's sendData callback,
 *   - copies of everything bzrtp hands out through its callbacks (SAS, SRTP
 *     keys, negotiated algorithms, cache-mismatch flag, "verified" flag,
 *     exported key, retained secrets as written in the cache, zuid, role,
 *     status messages).
 *
 * The header /usr/include/bzrtp/bzrtp.h of bzrtp 5.1 is the only interface
 * used: no private structure layout is assumed.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>
#include <bzrtp/bzrtp.h>

/* Exported by libbzrtp 5.1 (BZRTP_EXPORT) but declared only in its private
 * zidCache.h: finds the cache row id of (self URI, peer URI, peer ZID). */
int bzrtp_cache_getZuid(void *dbPointer, const char *selfURI, const char *peerURI, const uint8_t peerZID[12],
			const uint8_t insertFlag, int *zuid, bctbx_mutex_t *zidCacheMutex);
#define KSHIM_ZIDCACHE_DONT_INSERT_ZUID 0

/* Error stages reported by kshim_new (out parameter `stage`). */
#define KSHIM_STAGE_OK 0
#define KSHIM_STAGE_ALLOC 1
#define KSHIM_STAGE_SQLITE_OPEN 2
#define KSHIM_STAGE_CREATE_CONTEXT 3
#define KSHIM_STAGE_SET_CACHE 4
#define KSHIM_STAGE_SET_CALLBACKS 5
#define KSHIM_STAGE_INIT_CONTEXT 6
#define KSHIM_STAGE_SET_CLIENT_DATA 7
#define KSHIM_STAGE_AUX_SECRET 8
#define KSHIM_STAGE_BAD_CONFIG 9

#define KSHIM_MAX_EXPORT 64
#define KSHIM_MAX_SAS 64
#define KSHIM_MAX_KEY 32
#define KSHIM_MAX_SALT 16
#define KSHIM_MAX_SECRET 64

/* Mirrors `ShimConfig` in src/ffi.rs (repr(C)). */
typedef struct kshim_config {
	const char *cache_path; /* NULL: cacheless; ":memory:" allowed */
	const char *self_uri;
	const char *peer_uri;
	uint32_t ssrc;
	const uint8_t *hash;
	uint8_t hash_count;
	const uint8_t *cipher;
	uint8_t cipher_count;
	const uint8_t *auth_tag;
	uint8_t auth_tag_count;
	const uint8_t *key_agreement;
	uint8_t key_agreement_count;
	const uint8_t *sas;
	uint8_t sas_count;
	const uint8_t *export_label;
	size_t export_label_len;
	const uint8_t *aux_secret; /* NULL: none */
	size_t aux_secret_len;
} kshim_config;

typedef struct kshim_packet {
	uint8_t *data;
	uint16_t len;
} kshim_packet;

typedef struct kshim_blob {
	uint8_t present;
	uint8_t len;
	uint8_t data[KSHIM_MAX_SECRET];
} kshim_blob;

typedef struct kshim_endpoint {
	bzrtpContext_t *ctx;
	sqlite3 *db;
	uint32_t ssrc;
	char *self_uri;
	char *peer_uri;

	/* outgoing FIFO */
	kshim_packet *queue;
	size_t q_head;
	size_t q_len;
	size_t q_cap;
	int q_oom; /* set if a packet could not be queued */

	/* srtpSecretsAvailable / startSrtpSession */
	int secrets_parts; /* OR of ZRTP_SRTP_SECRETS_FOR_SENDER/RECEIVER seen */
	int srtp_started;
	int32_t verified;
	char sas[KSHIM_MAX_SAS];
	uint8_t sas_len; /* strlen(sas) */
	uint8_t hash_algo, cipher_algo, auth_tag_algo, key_agreement_algo, sas_algo;
	uint8_t cache_mismatch;
	uint8_t aux_secret_mismatch;
	uint8_t self_key[KSHIM_MAX_KEY], self_key_len;
	uint8_t self_salt[KSHIM_MAX_SALT], self_salt_len;
	uint8_t peer_key[KSHIM_MAX_KEY], peer_key_len;
	uint8_t peer_salt[KSHIM_MAX_SALT], peer_salt_len;

	/* contextReadyForExportedKeys */
	uint8_t *export_label;
	size_t export_label_len;
	int export_ready;
	int export_rc;
	int zuid;
	int cb_role;
	uint8_t exported[KSHIM_MAX_EXPORT];
	size_t exported_len;
	kshim_blob rs1_at_export;
	kshim_blob rs2_at_export;

	/* statusMessage counters */
	int msg_cache_mismatch;
	int msg_peer_version_obsolete;
	int msg_peer_not_bzrtp;
	int msg_errors;
} kshim_endpoint;

/* ---------------------------------------------------------------- helpers */

static char *dup_str(const char *s) {
	size_t n;
	char *d;
	if (s == NULL) {
		return NULL;
	}
	n = strlen(s);
	d = (char *)malloc(n + 1);
	if (d != NULL) {
		memcpy(d, s, n + 1);
	}
	return d;
}

static void copy_bounded(uint8_t *dst, uint8_t *dst_len, size_t cap, const uint8_t *src, size_t len) {
	if (src == NULL) {
		*dst_len = 0;
		return;
	}
	if (len > cap) {
		len = cap;
	}
	memcpy(dst, src, len);
	*dst_len = (uint8_t)len;
}

static void read_cache_blob(kshim_endpoint *ep, const char *column, kshim_blob *out) {
	const char *cols[1];
	uint8_t *vals[1] = {NULL};
	size_t lens[1] = {0};
	memset(out, 0, sizeof(*out));
	if (ep->db == NULL || ep->zuid <= 0) {
		return;
	}
	cols[0] = column;
	if (bzrtp_cache_read_lock(ep->db, ep->zuid, "zrtp", cols, vals, lens, 1, NULL) != 0) {
		return;
	}
	if (vals[0] != NULL) {
		size_t n = lens[0] > KSHIM_MAX_SECRET ? KSHIM_MAX_SECRET : lens[0];
		memcpy(out->data, vals[0], n);
		out->len = (uint8_t)n;
		out->present = 1;
		free(vals[0]);
	}
}

/* ------------------------------------------------------------- callbacks */

static int cb_status(void *client, const uint8_t level, const uint8_t id, const char *msg) {
	kshim_endpoint *ep = (kshim_endpoint *)client;
	(void)msg;
	if (ep == NULL) {
		return 0;
	}
	if (level == BZRTP_MESSAGE_ERROR) {
		ep->msg_errors++;
	}
	switch (id) {
		case BZRTP_MESSAGE_CACHEMISMATCH:
			ep->msg_cache_mismatch++;
			break;
		case BZRTP_MESSAGE_PEERVERSIONOBSOLETE:
			ep->msg_peer_version_obsolete++;
			break;
		case BZRTP_MESSAGE_PEERNOTBZRTP:
			ep->msg_peer_not_bzrtp++;
			break;
		default:
			break;
	}
	return 0;
}

static int cb_send(void *client, const uint8_t *packet, uint16_t len) {
	kshim_endpoint *ep = (kshim_endpoint *)client;
	uint8_t *copy;
	if (ep == NULL || packet == NULL) {
		return -1;
	}
	if (ep->q_len == ep->q_cap) {
		size_t ncap = ep->q_cap == 0 ? 16 : ep->q_cap * 2;
		kshim_packet *nq = (kshim_packet *)malloc(ncap * sizeof(kshim_packet));
		size_t i;
		if (nq == NULL) {
			ep->q_oom = 1;
			return -1;
		}
		for (i = 0; i < ep->q_len; i++) {
			nq[i] = ep->queue[(ep->q_head + i) % ep->q_cap];
		}
		free(ep->queue);
		ep->queue = nq;
		ep->q_head = 0;
		ep->q_cap = ncap;
	}
	copy = (uint8_t *)malloc(len == 0 ? 1 : len);
	if (copy == NULL) {
		ep->q_oom = 1;
		return -1;
	}
	memcpy(copy, packet, len);
	ep->queue[(ep->q_head + ep->q_len) % ep->q_cap].data = copy;
	ep->queue[(ep->q_head + ep->q_len) % ep->q_cap].len = len;
	ep->q_len++;
	return 0;
}

static void record_secrets(kshim_endpoint *ep, const bzrtpSrtpSecrets_t *s) {
	if (s->sas != NULL) {
		size_t n = strlen(s->sas);
		if (n >= KSHIM_MAX_SAS) {
			n = KSHIM_MAX_SAS - 1;
		}
		memcpy(ep->sas, s->sas, n);
		ep->sas[n] = '\0';
		ep->sas_len = (uint8_t)n;
	}
	ep->hash_algo = s->hashAlgo;
	ep->cipher_algo = s->cipherAlgo;
	ep->auth_tag_algo = s->authTagAlgo;
	ep->key_agreement_algo = s->keyAgreementAlgo;
	ep->sas_algo = s->sasAlgo;
	ep->cache_mismatch = s->cacheMismatch;
	ep->aux_secret_mismatch = s->auxSecretMismatch;
}

static int cb_secrets(void *client, const bzrtpSrtpSecrets_t *s, uint8_t part) {
	kshim_endpoint *ep = (kshim_endpoint *)client;
	if (ep == NULL || s == NULL) {
		return -1;
	}
	if (part & ZRTP_SRTP_SECRETS_FOR_SENDER) {
		copy_bounded(ep->self_key, &ep->self_key_len, KSHIM_MAX_KEY, s->selfSrtpKey, s->selfSrtpKeyLength);
		copy_bounded(ep->self_salt, &ep->self_salt_len, KSHIM_MAX_SALT, s->selfSrtpSalt, s->selfSrtpSaltLength);
	}
	if (part & ZRTP_SRTP_SECRETS_FOR_RECEIVER) {
		copy_bounded(ep->peer_key, &ep->peer_key_len, KSHIM_MAX_KEY, s->peerSrtpKey, s->peerSrtpKeyLength);
		copy_bounded(ep->peer_salt, &ep->peer_salt_len, KSHIM_MAX_SALT, s->peerSrtpSalt, s->peerSrtpSaltLength);
	}
	ep->secrets_parts |= part;
	record_secrets(ep, s);
	return 0;
}

static int cb_start_srtp(void *client, const bzrtpSrtpSecrets_t *s, int32_t verified) {
	kshim_endpoint *ep = (kshim_endpoint *)client;
	if (ep == NULL || s == NULL) {
		return -1;
	}
	record_secrets(ep, s);
	ep->verified = verified;
	ep->srtp_started = 1;
	return 0;
}

static int cb_export(void *client, int zuid, uint8_t role) {
	kshim_endpoint *ep = (kshim_endpoint *)client;
	size_t len = KSHIM_MAX_EXPORT;
	if (ep == NULL) {
		return -1;
	}
	ep->zuid = zuid;
	ep->cb_role = role;
	/* s0 is still alive during this callback: this is the only moment
	 * bzrtp_exportKey can work (bzrtp erases s0 and its master exported key
	 * right after the callback returns). */
	ep->export_rc = bzrtp_exportKey(ep->ctx, (char *)ep->export_label, ep->export_label_len, ep->exported, &len);
	if (ep->export_rc == 0) {
		ep->exported_len = len;
	}
	ep->export_ready = 1;
	/* rs1/rs2 have just been written to the cache (before this callback) */
	read_cache_blob(ep, "rs1", &ep->rs1_at_export);
	read_cache_blob(ep, "rs2", &ep->rs2_at_export);
	return 0;
}

/* ----------------------------------------------------------------- API */

void kshim_free(kshim_endpoint *ep);

kshim_endpoint *kshim_new(const kshim_config *cfg, int *stage, int *detail) {
	kshim_endpoint *ep;
	bzrtpCallbacks_t cbs;
	int rc;
	uint8_t algos[7];

	*stage = KSHIM_STAGE_OK;
	*detail = 0;

	if (cfg == NULL || cfg->self_uri == NULL || cfg->peer_uri == NULL || cfg->hash_count > 7 || cfg->cipher_count > 7 ||
	    cfg->auth_tag_count > 7 || cfg->key_agreement_count > 7 || cfg->sas_count > 7) {
		*stage = KSHIM_STAGE_BAD_CONFIG;
		return NULL;
	}

	ep = (kshim_endpoint *)calloc(1, sizeof(kshim_endpoint));
	if (ep == NULL) {
		*stage = KSHIM_STAGE_ALLOC;
		return NULL;
	}
	ep->ssrc = cfg->ssrc;
	ep->self_uri = dup_str(cfg->self_uri);
	ep->peer_uri = dup_str(cfg->peer_uri);
	ep->export_label_len = cfg->export_label_len;
	ep->export_label = (uint8_t *)malloc(cfg->export_label_len + 1);
	ep->cb_role = -1;
	if (ep->self_uri == NULL || ep->peer_uri == NULL || ep->export_label == NULL) {
		*stage = KSHIM_STAGE_ALLOC;
		kshim_free(ep);
		return NULL;
	}
	if (cfg->export_label_len > 0) {
		memcpy(ep->export_label, cfg->export_label, cfg->export_label_len);
	}
	ep->export_label[cfg->export_label_len] = 0;

	if (cfg->cache_path != NULL) {
		rc = sqlite3_open_v2(cfg->cache_path, &ep->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL);
		if (rc != SQLITE_OK) {
			*stage = KSHIM_STAGE_SQLITE_OPEN;
			*detail = rc;
			kshim_free(ep);
			return NULL;
		}
	}

	ep->ctx = bzrtp_createBzrtpContext();
	if (ep->ctx == NULL) {
		*stage = KSHIM_STAGE_CREATE_CONTEXT;
		kshim_free(ep);
		return NULL;
	}

	if (ep->db != NULL) {
		rc = bzrtp_setZIDCache_lock(ep->ctx, ep->db, ep->self_uri, ep->peer_uri, NULL);
		if (rc != 0 && rc != BZRTP_CACHE_SETUP && rc != BZRTP_CACHE_UPDATE) {
			*stage = KSHIM_STAGE_SET_CACHE;
			*detail = rc;
			kshim_free(ep);
			return NULL;
		}
	}

	memset(&cbs, 0, sizeof(cbs));
	cbs.bzrtp_statusMessage = cb_status;
	cbs.bzrtp_messageLevel = BZRTP_MESSAGE_DEBUG;
	cbs.bzrtp_sendData = cb_send;
	cbs.bzrtp_srtpSecretsAvailable = cb_secrets;
	cbs.bzrtp_startSrtpSession = cb_start_srtp;
	cbs.bzrtp_contextReadyForExportedKeys = cb_export;
	rc = bzrtp_setCallbacks(ep->ctx, &cbs);
	if (rc != 0) {
		*stage = KSHIM_STAGE_SET_CALLBACKS;
		*detail = rc;
		kshim_free(ep);
		return NULL;
	}

	/* Algorithm lists must be set before bzrtp_initBzrtpContext: the Hello
	 * packet is built once, when the first channel is initialised. Note that
	 * bzrtp always appends the mandatory algorithms it lacks (S256, AES1,
	 * HS32+HS80, DH3k+Mult, B32). An empty list keeps bzrtp's default. */
#define KSHIM_SET(TYPE, PTR, COUNT)                                                                  \
	if ((COUNT) > 0 && (PTR) != NULL) {                                                              \
		memcpy(algos, (PTR), (COUNT));                                                               \
		bzrtp_setSupportedCryptoTypes(ep->ctx, (TYPE), algos, (COUNT));                              \
	}
	KSHIM_SET(ZRTP_HASH_TYPE, cfg->hash, cfg->hash_count)
	KSHIM_SET(ZRTP_CIPHERBLOCK_TYPE, cfg->cipher, cfg->cipher_count)
	KSHIM_SET(ZRTP_AUTHTAG_TYPE, cfg->auth_tag, cfg->auth_tag_count)
	KSHIM_SET(ZRTP_KEYAGREEMENT_TYPE, cfg->key_agreement, cfg->key_agreement_count)
	KSHIM_SET(ZRTP_SAS_TYPE, cfg->sas, cfg->sas_count)
#undef KSHIM_SET

	rc = bzrtp_initBzrtpContext(ep->ctx, ep->ssrc);
	if (rc != 0) {
		*stage = KSHIM_STAGE_INIT_CONTEXT;
		*detail = rc;
		kshim_free(ep);
		return NULL;
	}
	rc = bzrtp_setClientData(ep->ctx, ep->ssrc, ep);
	if (rc != 0) {
		*stage = KSHIM_STAGE_SET_CLIENT_DATA;
		*detail = rc;
		kshim_free(ep);
		return NULL;
	}
	if (cfg->aux_secret != NULL) {
		rc = bzrtp_setAuxiliarySharedSecret(ep->ctx, cfg->aux_secret, cfg->aux_secret_len);
		if (rc != 0) {
			*stage = KSHIM_STAGE_AUX_SECRET;
			*detail = rc;
			kshim_free(ep);
			return NULL;
		}
	}
	return ep;
}

void kshim_free(kshim_endpoint *ep) {
	size_t i;
	if (ep == NULL) {
		return;
	}
	if (ep->ctx != NULL) {
		/* Destroys our only channel and then, no channel being left, the
		 * whole context (also when init failed before the channel existed). */
		(void)bzrtp_destroyBzrtpContext(ep->ctx, ep->ssrc);
		ep->ctx = NULL;
	}
	if (ep->db != NULL) {
		sqlite3_close(ep->db);
		ep->db = NULL;
	}
	for (i = 0; i < ep->q_len; i++) {
		free(ep->queue[(ep->q_head + i) % ep->q_cap].data);
	}
	free(ep->queue);
	free(ep->self_uri);
	free(ep->peer_uri);
	if (ep->export_label != NULL) {
		free(ep->export_label);
	}
	/* wipe copies of key material before release */
	memset(ep, 0, sizeof(*ep));
	free(ep);
}

int kshim_start(kshim_endpoint *ep) {
	return bzrtp_startChannelEngine(ep->ctx, ep->ssrc);
}

int kshim_iterate(kshim_endpoint *ep, uint64_t now_ms) {
	return bzrtp_iterate(ep->ctx, ep->ssrc, now_ms);
}

int kshim_process(kshim_endpoint *ep, const uint8_t *packet, size_t len) {
	uint8_t *copy;
	int rc;
	if (len == 0 || len > 0xFFFF) {
		return -1;
	}
	/* bzrtp_processMessage takes a non-const buffer */
	copy = (uint8_t *)malloc(len);
	if (copy == NULL) {
		return -2;
	}
	memcpy(copy, packet, len);
	rc = bzrtp_processMessage(ep->ctx, ep->ssrc, copy, (uint16_t)len);
	free(copy);
	return rc;
}

/* Length of the next queued outgoing packet, 0 if the queue is empty. */
size_t kshim_next_len(const kshim_endpoint *ep) {
	if (ep->q_len == 0) {
		return 0;
	}
	return ep->queue[ep->q_head].len;
}

/* Pops the next outgoing packet into buf. Returns its length, or 0 if the
 * queue is empty or buf is too small (the packet then stays queued). */
size_t kshim_pop(kshim_endpoint *ep, uint8_t *buf, size_t cap) {
	kshim_packet p;
	if (ep->q_len == 0) {
		return 0;
	}
	p = ep->queue[ep->q_head];
	if (p.len > cap) {
		return 0;
	}
	memcpy(buf, p.data, p.len);
	free(p.data);
	ep->q_head = (ep->q_head + 1) % ep->q_cap;
	ep->q_len--;
	return p.len;
}

int kshim_queue_overflowed(const kshim_endpoint *ep) {
	return ep->q_oom;
}

int kshim_channel_status(const kshim_endpoint *ep) {
	return bzrtp_getChannelStatus(ep->ctx, ep->ssrc);
}

/* Copies the NUL-terminated SAS into buf; returns its length (0 if none). */
size_t kshim_sas(const kshim_endpoint *ep, char *buf, size_t cap) {
	size_t n = ep->sas_len;
	if (n == 0 || cap == 0) {
		return 0;
	}
	if (n >= cap) {
		n = cap - 1;
	}
	memcpy(buf, ep->sas, n);
	buf[n] = '\0';
	return n;
}

/* Negotiated algorithms, as bzrtp.h codes: out[0..5] = hash, cipher,
 * auth tag, key agreement, sas. Returns 1 once the SRTP secrets are known. */
int kshim_algos(const kshim_endpoint *ep, uint8_t out[5]) {
	out[0] = ep->hash_algo;
	out[1] = ep->cipher_algo;
	out[2] = ep->auth_tag_algo;
	out[3] = ep->key_agreement_algo;
	out[4] = ep->sas_algo;
	return ep->secrets_parts != 0 || ep->srtp_started;
}

/* Flags: [0] srtp started, [1] verified (PVS of both sides), [2] cache
 * mismatch (from srtpSecrets), [3] aux secret mismatch code, [4] export
 * callback seen, [5] role from that callback (0 initiator, 1 responder,
 * -1 unknown), [6] bzrtp_exportKey return code, [7] zuid,
 * [8] cache-mismatch status messages, [9] peer-version-obsolete messages,
 * [10] peer-not-bzrtp messages, [11] error-level messages,
 * [12] secrets parts seen (bit 1 sender, bit 2 receiver). */
void kshim_flags(const kshim_endpoint *ep, int32_t out[13]) {
	out[0] = ep->srtp_started;
	out[1] = ep->verified;
	out[2] = ep->cache_mismatch;
	out[3] = ep->aux_secret_mismatch;
	out[4] = ep->export_ready;
	out[5] = ep->cb_role;
	out[6] = ep->export_rc;
	out[7] = ep->zuid;
	out[8] = ep->msg_cache_mismatch;
	out[9] = ep->msg_peer_version_obsolete;
	out[10] = ep->msg_peer_not_bzrtp;
	out[11] = ep->msg_errors;
	out[12] = ep->secrets_parts;
}

/* Exported key derived in the contextReadyForExportedKeys callback. */
size_t kshim_exported_key(const kshim_endpoint *ep, uint8_t *buf, size_t cap) {
	size_t n;
	if (!ep->export_ready || ep->export_rc != 0) {
		return 0;
	}
	n = ep->exported_len < cap ? ep->exported_len : cap;
	memcpy(buf, ep->exported, n);
	return n;
}

/* which: 0 self key, 1 self salt, 2 peer key, 3 peer salt. */
size_t kshim_srtp(const kshim_endpoint *ep, int which, uint8_t *buf, size_t cap) {
	const uint8_t *src;
	size_t n;
	switch (which) {
		case 0: src = ep->self_key; n = ep->self_key_len; break;
		case 1: src = ep->self_salt; n = ep->self_salt_len; break;
		case 2: src = ep->peer_key; n = ep->peer_key_len; break;
		case 3: src = ep->peer_salt; n = ep->peer_salt_len; break;
		default: return 0;
	}
	if (n > cap) {
		n = cap;
	}
	memcpy(buf, src, n);
	return n;
}

/* Retained secret as read from the cache right after bzrtp wrote it
 * (which: 1 = rs1, 2 = rs2). Returns length, 0 if absent. */
size_t kshim_rs_at_export(const kshim_endpoint *ep, int which, uint8_t *buf, size_t cap) {
	const kshim_blob *b = which == 1 ? &ep->rs1_at_export : &ep->rs2_at_export;
	size_t n;
	if (!b->present) {
		return 0;
	}
	n = b->len < cap ? b->len : cap;
	memcpy(buf, b->data, n);
	return n;
}

/* Reads a column ("rs1", "rs2", "pvs", ...) of this peer's row in the zrtp
 * table now. Returns length, 0 if absent/NULL, -1 if no cache/zuid, -2 on
 * cache error, -3 if buf too small. */
long kshim_cache_read(kshim_endpoint *ep, const char *column, uint8_t *buf, size_t cap) {
	const char *cols[1];
	uint8_t *vals[1] = {NULL};
	size_t lens[1] = {0};
	long n;
	if (ep->db == NULL || ep->zuid <= 0) {
		return -1;
	}
	cols[0] = column;
	if (bzrtp_cache_read_lock(ep->db, ep->zuid, "zrtp", cols, vals, lens, 1, NULL) != 0) {
		return -2;
	}
	if (vals[0] == NULL) {
		return 0;
	}
	if (lens[0] > cap) {
		free(vals[0]);
		return -3;
	}
	memcpy(buf, vals[0], lens[0]);
	n = (long)lens[0];
	free(vals[0]);
	return n;
}

/* Looks up the zuid of our peer (by its ZID) when bzrtp did not hand it to
 * us (the export callback is delayed after a cache mismatch). Returns the
 * zuid, 0 if not found, -1 without cache. */
int kshim_resolve_zuid(kshim_endpoint *ep, const uint8_t peer_zid[12]) {
	int zuid = 0;
	if (ep->db == NULL) {
		return -1;
	}
	if (ep->zuid > 0) {
		return ep->zuid;
	}
	if (bzrtp_cache_getZuid(ep->db, ep->self_uri, ep->peer_uri, peer_zid, KSHIM_ZIDCACHE_DONT_INSERT_ZUID, &zuid, NULL) == 0 &&
	    zuid > 0) {
		ep->zuid = zuid;
	}
	return ep->zuid;
}

/* Overwrites a column of this peer's row in the zrtp table (test hook,
 * e.g. to corrupt rs1). Returns bzrtp's code, -1 if no cache/zuid. */
int kshim_cache_write(kshim_endpoint *ep, const char *column, const uint8_t *data, size_t len) {
	const char *cols[1];
	uint8_t *vals[1];
	size_t lens[1];
	uint8_t *copy;
	int rc;
	if (ep->db == NULL || ep->zuid <= 0) {
		return -1;
	}
	copy = (uint8_t *)malloc(len == 0 ? 1 : len);
	if (copy == NULL) {
		return -2;
	}
	memcpy(copy, data, len);
	cols[0] = column;
	vals[0] = copy;
	lens[0] = len;
	rc = bzrtp_cache_write_lock(ep->db, ep->zuid, "zrtp", cols, vals, lens, 1, NULL);
	free(copy);
	return rc;
}

void kshim_sas_verified(kshim_endpoint *ep) {
	bzrtp_SASVerified(ep->ctx);
}

void kshim_sas_reset_verified(kshim_endpoint *ep) {
	bzrtp_resetSASVerified(ep->ctx);
}

/* "1.10 <64 hex>" of our own Hello (what SDP a=zrtp-hash carries). */
int kshim_self_hello_hash(kshim_endpoint *ep, char *buf, size_t cap) {
	return bzrtp_getSelfHelloHash(ep->ctx, ep->ssrc, (uint8_t *)buf, cap);
}

/* Peer's cache trust status for our peer URI (BZRTP_CACHE_PEER_STATUS_*),
 * -1 when running cacheless. */
int kshim_peer_status(kshim_endpoint *ep) {
	if (ep->db == NULL) {
		return -1;
	}
	return bzrtp_cache_getPeerStatus_lock(ep->db, ep->peer_uri, NULL);
}
