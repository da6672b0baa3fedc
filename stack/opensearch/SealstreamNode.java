/*
 * Runs a single OpenSearch node from Maven Central jars for Sealstream's local stack.
 *
 * The distribution's launcher (org.opensearch.bootstrap.OpenSearch) only loads plugins from
 * directories, so we do what OpenSearch's own test framework (MockNode) does instead: subclass
 * Node and hand the plugin classes on the classpath to its protected constructor.
 *
 * Usage: java -cp classes:<classpath> SealstreamNode key=value ...
 * Each argument is one node setting (path.home is required). Settings come only from the
 * arguments: OpenSearch and Netty read several -Dopensearch.* JVM flags themselves, so system
 * properties are left to them.
 */

import java.nio.file.Path;
import java.util.Collection;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

import org.opensearch.analysis.common.CommonAnalysisPlugin;
import org.opensearch.common.logging.LogConfigurator;
import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.node.InternalSettingsPreparer;
import org.opensearch.node.Node;
import org.opensearch.plugins.Plugin;
import org.opensearch.transport.Netty4Plugin;

public final class SealstreamNode extends Node {

    /**
     * Netty4Plugin: real HTTP + transport layers; CommonAnalysisPlugin: the standard filters;
     * SealstreamIcuPlugin (same folder): ICU analysis under the official analysis-icu names.
     */
    static final List<Class<? extends Plugin>> PLUGINS =
        List.of(Netty4Plugin.class, CommonAnalysisPlugin.class, SealstreamIcuPlugin.class);

    private SealstreamNode(Environment environment, Collection<Class<? extends Plugin>> plugins) {
        // true = refuse private index settings in requests, as Node(Environment) and MockNode do.
        super(environment, plugins, true);
    }

    public static void main(String[] args) throws Exception {
        Settings.Builder builder = Settings.builder();
        for (String arg : args) {
            int eq = arg.indexOf('=');
            if (eq <= 0) {
                throw new IllegalArgumentException("expected key=value, got: " + arg);
            }
            builder.put(arg.substring(0, eq), arg.substring(eq + 1));
        }
        Settings settings = builder.build();
        String home = settings.get("path.home");
        if (home == null) {
            throw new IllegalArgumentException("path.home is required");
        }

        // Reads <path.home>/config/opensearch.yml if present and fills in path.* defaults.
        Environment environment = InternalSettingsPreparer.prepareEnvironment(
            settings, Map.of(), Path.of(home, "config"), () -> "sealstream");
        // Loads <config>/log4j2.properties (it must exist) and sets the node name used in log lines;
        // the distribution's Bootstrap does this, Node itself does not.
        LogConfigurator.registerErrorListener();
        LogConfigurator.setNodeName(Node.NODE_NAME_SETTING.get(environment.settings()));
        LogConfigurator.configure(environment);

        Node node = new SealstreamNode(environment, PLUGINS);
        CountDownLatch stopped = new CountDownLatch(1);
        // SIGTERM/SIGINT: close the node cleanly (flushes translogs, releases the data lock).
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                node.close();
                node.awaitClose(30, TimeUnit.SECONDS);
            } catch (Exception e) {
                e.printStackTrace();
            } finally {
                stopped.countDown();
            }
        }, "sealstream-shutdown"));
        node.start();
        // OpenSearch's threads are daemons: keep the JVM alive until the shutdown hook runs.
        stopped.await();
    }
}
