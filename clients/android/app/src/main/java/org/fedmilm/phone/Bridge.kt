// UNBUILT SAMPLE (never compiled): see clients/android/README.md.
// Client of the bridge protocol designed in PROTOCOL.md (the bridge itself is not implemented).
package org.fedmilm.phone

import android.content.Context
import org.json.JSONObject
import java.io.File
import java.net.HttpURLConnection
import java.net.URL
import java.nio.ByteBuffer
import java.nio.ByteOrder

data class JobOffer(val id: String, val job: TrainJob, val bundleId: String, val adapterPath: String)

class Bridge(private val base: String, private val token: String, private val device: String) {
    fun nextJob(): JobOffer? {
        val conn = open("/v1/jobs/next?device=$device")
        if (conn.responseCode == 204) return null
        check(conn.responseCode == 200) { "bridge answered ${conn.responseCode}" }
        val body = JSONObject(conn.inputStream.bufferedReader().readText())
        return JobOffer(body.getString("id"), TrainJob.parse(body.getJSONObject("job").toString()),
            body.getString("bundle"), body.getString("adapter"))
    }

    /** Bundles are immutable and named by their hash: downloaded once. */
    fun ensureBundle(bundleId: String, root: File): File {
        val dir = File(root, bundleId)
        if (File(dir, "manifest.json").isFile) return dir
        val partial = File(root, "$bundleId.partial").apply { deleteRecursively(); mkdirs() }
        for (name in listOf("manifest.json", "base.ptd", "train.pte", "eval.pte", "adamw.pte",
                             "dp_grad.pte")) {
            val conn = open("/v1/bundles/$bundleId/$name")
            if (conn.responseCode == 404 && name == "dp_grad.pte") continue
            conn.inputStream.use { input -> File(partial, name).outputStream().use { input.copyTo(it) } }
        }
        check(partial.renameTo(dir)) { "could not install bundle $bundleId" }
        return dir
    }

    /** Every adapter tensor, float32 little-endian in manifest order (the programs take the
     *  adapter as inputs, so the phone needs no FlatTensor reader). */
    fun downloadAdapter(offer: JobOffer, bundle: BundleManifest): List<FloatArray> {
        val bytes = open(offer.adapterPath).inputStream.use { it.readBytes() }
        val buffer = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN)
        val sizes = bundle.adapter.map { t -> t.shape.fold(1L) { a, b -> a * b }.toInt() }
        check(bytes.size == sizes.sum() * 4) { "adapter download has the wrong size" }
        return sizes.map { n -> FloatArray(n) { buffer.getFloat() } }
    }

    /** Only the global tensors leave the phone: float32 little-endian, manifest order. */
    fun upload(offer: JobOffer, bundle: BundleManifest, trained: Map<String, FloatArray>, result: JobResult) {
        val global = bundle.adapter.filter { it.part == "global" }
        val bytes = ByteBuffer.allocate(global.sumOf { trained.getValue(it.programKey).size } * 4)
            .order(ByteOrder.LITTLE_ENDIAN)
        global.forEach { t -> trained.getValue(t.programKey).forEach { bytes.putFloat(it) } }
        val conn = open("/v1/jobs/${offer.id}/result", method = "POST")
        conn.doOutput = true
        conn.setRequestProperty("X-Fedmilm-Result", result.toJson())
        conn.outputStream.use { it.write(bytes.array()) }
        check(conn.responseCode == 204) { "upload refused: ${conn.responseCode}" }
    }

    private fun open(path: String, method: String = "GET"): HttpURLConnection =
        (URL(base + path).openConnection() as HttpURLConnection).apply {
            requestMethod = method
            setRequestProperty("Authorization", "Bearer $token")
        }

    companion object {
        fun fromSettings(context: Context): Bridge? {
            val prefs = context.getSharedPreferences("fedmilm", Context.MODE_PRIVATE)
            val base = prefs.getString("bridge", null) ?: return null
            require(base.startsWith("https://")) { "the bridge must be reached over TLS" }
            return Bridge(base, prefs.getString("token", "")!!, prefs.getString("device", "")!!)
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
