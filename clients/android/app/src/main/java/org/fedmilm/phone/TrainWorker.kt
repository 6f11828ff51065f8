// UNBUILT SAMPLE (never compiled): see clients/android/README.md.
// Schedules training only under the device policy of conf/device/default.yaml and moves files
// over the (designed, not yet implemented) bridge protocol of PROTOCOL.md.
package org.fedmilm.phone

import android.content.Context
import androidx.work.Constraints
import androidx.work.CoroutineWorker
import androidx.work.ExistingPeriodicWorkPolicy
import androidx.work.NetworkType
import androidx.work.PeriodicWorkRequestBuilder
import androidx.work.WorkManager
import androidx.work.WorkerParameters
import java.io.File
import java.util.concurrent.TimeUnit

class TrainWorker(context: Context, params: WorkerParameters) : CoroutineWorker(context, params) {
    override suspend fun doWork(): Result {
        val bridge = Bridge.fromSettings(applicationContext) ?: return Result.failure()
        val offer = bridge.nextJob() ?: return Result.success()  // nothing to do this time
        val bundleDir = bridge.ensureBundle(offer.bundleId, File(applicationContext.filesDir, "bundles"))
        val bundle = BundleManifest.read(bundleDir)
        val adapter = bridge.downloadAdapter(offer, bundle)
        val personal = Personal.load(applicationContext.filesDir, bundle)
        val examples = LocalExamples.read(File(applicationContext.filesDir, "interactions.jsonl"))
        val (trained, result) = PhoneTrainer(bundle).run(offer.job, adapter, personal, examples)
        Personal.save(applicationContext.filesDir, bundle, trained)  // never leaves the phone
        bridge.upload(offer, bundle, trained, result)  // global part + counts only
        return Result.success()
    }

    companion object {
        fun schedule(context: Context) {
            val constraints = Constraints.Builder()
                .setRequiresCharging(true)
                .setRequiredNetworkType(NetworkType.UNMETERED)
                .setRequiresBatteryNotLow(true)
                .setRequiresDeviceIdle(true)
                .build()
            val request = PeriodicWorkRequestBuilder<TrainWorker>(1, TimeUnit.DAYS)
                .setConstraints(constraints).build()
            WorkManager.getInstance(context).enqueueUniquePeriodicWork(
                "fedmilm-train", ExistingPeriodicWorkPolicy.KEEP, request)
        }
    }
}
