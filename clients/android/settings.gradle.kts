// UNBUILT SAMPLE: see README.md.
pluginManagement { repositories { google(); mavenCentral(); gradlePluginPortal() } }
dependencyResolutionManagement { repositories { google(); mavenCentral() } }
rootProject.name = "fedmilm-phone"
include(":app")
