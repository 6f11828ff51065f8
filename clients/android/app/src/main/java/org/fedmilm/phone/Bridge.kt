// UNBUILT SAMPLE (never compiled): see clients/android/README.md.
// Client of the HTTPS bridge of PROTOCOL.md (implemented in fedmilm/bridge/ and tested with the
// Python reference phone, clients/reference_phone.py, which this mirrors step for step).
package org.fedmilm.phone

import android.content.Context
import android.util.Base64
import org.json.JSONObject
import java.io.File
import java.net.HttpURLConnection
import java.net.URL
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.security.KeyPair
import java.security.KeyPairGenerator
import java.security.KeyStore
import java.security.MessageDigest
import java.security.SecureRandom
import java.security.Signature
import java.security.spec.ECGenParameterSpec

/** GET /v1/jobs/next, as schemas/offer.schema.json states it. */
data class JobOffer(
    val id: String, val round: Int, val job: TrainJob, val bundleId: String,
    val files: Map<String, Pair<Long, String>>,   // name -> (size, sha256)
    val adapterPath: String, val adapterSize: Long,
    val updatePath: String, val updateSize: Long,
    val resultPath: String, val clipNorm: Double?, val expires: Long,
)

class Expired : Exception("the job expired with its round (410)")

class Bridge(private val base: String, private val device: String, private val key: KeyPair) {
    /** Once: bind this phone's public key to its device with the one-time enrolment code. */
    fun register(enrolment: String) {
        val pem = "-----BEGIN PUBLIC KEY-----\n" +
            Base64.encodeToString(key.public.encoded, Base64.DEFAULT) + "-----END PUBLIC KEY-----\n"
        val body = JSONObject().put("device", device).put("public_key", pem)
            .put("enrolment", enrolment).toString().toByteArray()
        val conn = send("POST", "/v1/register", body, signed = false)
        check(conn.responseCode == 204) { "registration refused: ${conn.responseCode}" }
    }

    fun nextJob(): JobOffer? {
        val conn = send("GET", "/v1/jobs/next")
        if (conn.responseCode == 204) return null
        check(conn.responseCode == 200) { "bridge answered ${conn.responseCode}" }
        val o = JSONObject(conn.inputStream.bufferedReader().readText())
        val files = o.getJSONObject("files").let { f ->
            f.keys().asSequence().associateWith { name ->
                f.getJSONObject(name).let { it.getLong("size") to it.getString("sha256") } } }
        val adapter = o.getJSONObject("adapter"); val update = o.getJSONObject("update")
        return JobOffer(o.getString("id"), o.getInt("round"),
            TrainJob.parse(o.getJSONObject("job").toString()), o.getString("bundle"), files,
            adapter.getString("path"), adapter.getLong("size"),
            update.getString("path"), update.getLong("size"), o.getString("result"),
            if (o.isNull("clip_norm")) null else o.getDouble("clip_norm"), o.getLong("expires"))
    }

    /** Bundles are immutable and named by their manifest's hash: downloaded once, resumably,
     *  every file checked against the size and digest the offer lists. */
    fun ensureBundle(offer: JobOffer, root: File): File {
        val dir = File(root, offer.bundleId)
        if (File(dir, "manifest.json").isFile) return dir
        val partial = File(root, "${offer.bundleId}.partial").apply { mkdirs() }
        for ((name, spec) in offer.files) {
            require(File(name).name == name) { "bundle file name is not a plain name" }
            val file = File(partial, name)
            download("/v1/bundles/${offer.bundleId}/$name", file, spec.first)
            check(sha256(file) == spec.second) { file.delete(); "$name does not match its digest" }
        }
        check(sha256(File(partial, "manifest.json")) == offer.bundleId) { "not the job's bundle" }
        check(partial.renameTo(dir)) { "could not install bundle ${offer.bundleId}" }
        return dir
    }

    /** Every adapter tensor, float32 little-endian in manifest order (the programs take the
     *  adapter as inputs, so the phone needs no FlatTensor reader). */
    fun downloadAdapter(offer: JobOffer, bundle: BundleManifest, cache: File): List<FloatArray> {
        download(offer.adapterPath, cache, offer.adapterSize)
        val buffer = ByteBuffer.wrap(cache.readBytes()).order(ByteOrder.LITTLE_ENDIAN)
        val sizes = bundle.adapter.map { t -> t.shape.fold(1L) { a, b -> a * b }.toInt() }
        check(offer.adapterSize == sizes.sum() * 4L) { "adapter does not fit the bundle" }
        return sizes.map { n -> FloatArray(n) { buffer.getFloat() } }
    }

    /** Only the global part leaves the phone: trained minus received, clipped to the offer's
     *  clip_norm under user-level DP, float32 little-endian in manifest order, in pieces that
     *  resume where the bridge says it stopped. Then the result, which completes the job. */
    fun upload(offer: JobOffer, bundle: BundleManifest, received: List<FloatArray>,
               trained: Map<String, FloatArray>, result: JobResult) {
        val global = bundle.adapter.withIndex().filter { it.value.part == "global" }
        val deltas = global.map { (i, t) ->
            val now = trained.getValue(t.programKey); FloatArray(now.size) { now[it] - received[i][it] } }
        val norm = Math.sqrt(deltas.sumOf { d -> d.sumOf { (it * it).toDouble() } })
        val scale = offer.clipNorm?.let { minOf(1.0, it / maxOf(norm, 1e-12)) } ?: 1.0
        val bytes = ByteBuffer.allocate(deltas.sumOf { it.size } * 4).order(ByteOrder.LITTLE_ENDIAN)
        deltas.forEach { d -> d.forEach { bytes.putFloat((it * scale).toFloat()) } }
        val blob = bytes.array()
        check(blob.size.toLong() == offer.updateSize) { "update has the wrong size" }
        var held = received(offer)
        while (held < blob.size) {
            val piece = blob.copyOfRange(held, minOf(blob.size, held + PIECE))
            held = try {
                val conn = send("PUT", "${offer.updatePath}?offset=$held", piece)
                if (conn.responseCode == 410) throw Expired()
                check(conn.responseCode == 200) { "upload refused: ${conn.responseCode}" }
                JSONObject(conn.inputStream.bufferedReader().readText()).getInt("received")
            } catch (e: java.io.IOException) { Thread.sleep(1000); received(offer) }
        }
        // under user-level DP nothing derived from the phone's data leaves it but the update
        val told = if (offer.clipNorm == null) result else JobResult(0, 0, 0, 0.0, 0.0)
        val conn = send("POST", offer.resultPath, told.toJson().toByteArray())
        if (conn.responseCode == 410) throw Expired()
        check(conn.responseCode == 204) { "result refused: ${conn.responseCode}" }
    }

    private fun received(offer: JobOffer): Int =
        JSONObject(send("GET", offer.updatePath).inputStream.bufferedReader().readText()).getInt("received")

    /** `path` into `file`, resuming from what a dropped connection left there. */
    private fun download(path: String, file: File, size: Long) {
        while (file.length() < size) {
            val conn = send("GET", path, headers = mapOf("Range" to "bytes=${file.length()}-"))
            if (conn.responseCode == 410) throw Expired()
            check(conn.responseCode == 200 || conn.responseCode == 206) { "download: ${conn.responseCode}" }
            java.io.FileOutputStream(file, conn.responseCode == 206).use { out ->
                conn.inputStream.use { it.copyTo(out) } }
        }
        check(file.length() == size) { file.delete(); "$path is larger than announced" }
    }

    /** Every request but registration is signed with the phone's own key (PROTOCOL.md). */
    private fun send(method: String, target: String, body: ByteArray = ByteArray(0),
                     signed: Boolean = true, headers: Map<String, String> = emptyMap()): HttpURLConnection =
        (URL(base + target).openConnection() as HttpURLConnection).apply {
            requestMethod = method
            headers.forEach { (k, v) -> setRequestProperty(k, v) }
            if (signed) {
                val time = (System.currentTimeMillis() / 1000).toString()
                val nonce = Base64.encodeToString(ByteArray(16).also { SecureRandom().nextBytes(it) },
                    Base64.URL_SAFE or Base64.NO_WRAP or Base64.NO_PADDING)
                val text = listOf("fedmilm-bridge-v1", method, target, device, time, nonce,
                    hex(MessageDigest.getInstance("SHA-256").digest(body))).joinToString("\n")
                val signature = Signature.getInstance("SHA256withECDSA").run {
                    initSign(key.private); update(text.toByteArray()); sign() }
                setRequestProperty("X-Fedmilm-Device", device)
                setRequestProperty("X-Fedmilm-Time", time)
                setRequestProperty("X-Fedmilm-Nonce", nonce)
                setRequestProperty("X-Fedmilm-Signature", Base64.encodeToString(signature, Base64.NO_WRAP))
            }
            if (body.isNotEmpty() || method != "GET") {
                doOutput = true
                setFixedLengthStreamingMode(body.size)
                outputStream.use { it.write(body) }
            }
        }

    companion object {
        const val PIECE = 1 shl 20

        fun fromSettings(context: Context): Bridge? {
            val prefs = context.getSharedPreferences("fedmilm", Context.MODE_PRIVATE)
            val base = prefs.getString("bridge", null) ?: return null
            require(base.startsWith("https://")) { "the bridge must be reached over TLS" }
            return Bridge(base, prefs.getString("device", "")!!, ownKey())
        }

        /** The phone's signing key, made and kept in the Android Keystore (never exported). */
        private fun ownKey(): KeyPair {
            val store = KeyStore.getInstance("AndroidKeyStore").apply { load(null) }
            store.getEntry("fedmilm-bridge", null)?.let { entry ->
                entry as KeyStore.PrivateKeyEntry
                return KeyPair(entry.certificate.publicKey, entry.privateKey)
            }
            return KeyPairGenerator.getInstance("EC", "AndroidKeyStore").run {
                initialize(android.security.keystore.KeyGenParameterSpec.Builder("fedmilm-bridge",
                    android.security.keystore.KeyProperties.PURPOSE_SIGN)
                    .setAlgorithmParameterSpec(ECGenParameterSpec("secp256r1"))
                    .setDigests(android.security.keystore.KeyProperties.DIGEST_SHA256).build())
                generateKeyPair()
            }
        }

        private fun hex(bytes: ByteArray) = bytes.joinToString("") { "%02x".format(it) }

        fun sha256(file: File): String = MessageDigest.getInstance("SHA-256").let { md ->
            file.inputStream().use { input ->
                val buf = ByteArray(1 shl 20)
                while (true) { val n = input.read(buf); if (n < 0) break; md.update(buf, 0, n) }
            }
            hex(md.digest())
        }
    }
}

/** The phone's personal adapter tensors (never uploaded), one raw float32 file per tensor. */
object Personal {
    fun load(root: File, bundle: BundleManifest): Map<String, FloatArray> =
        bundle.adapter.filter { it.part == "personal" }.mapNotNull { t ->
            val file = File(root, "personal/${t.programKey}.f32")
            if (!file.isFile) null else t.programKey to ByteBuffer.wrap(file.readBytes())
                .order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer().let { b -> FloatArray(b.remaining()).also { b.get(it) } }
        }.toMap()

    fun save(root: File, bundle: BundleManifest, trained: Map<String, FloatArray>) {
        val dir = File(root, "personal").apply { mkdirs() }
        bundle.adapter.filter { it.part == "personal" }.forEach { t ->
            val values = trained.getValue(t.programKey)
            val bytes = ByteBuffer.allocate(values.size * 4).order(ByteOrder.LITTLE_ENDIAN)
            values.forEach { bytes.putFloat(it) }
            val tmp = File(dir, "${t.programKey}.tmp").apply { writeBytes(bytes.array()) }
            check(tmp.renameTo(File(dir, "${t.programKey}.f32")))  // atomic replace
        }
    }
}

/** Tokenised interactions kept by the assistant app: {"input_ids": [...], "labels": [...]}. */
object LocalExamples {
    fun read(file: File): List<Example> = file.readLines().filter { it.isNotBlank() }.map { line ->
        val j = JSONObject(line)
        val ids = j.getJSONArray("input_ids"); val labels = j.getJSONArray("labels")
        Example(LongArray(ids.length()) { ids.getLong(it) }, LongArray(labels.length()) { labels.getLong(it) })
    }
}
