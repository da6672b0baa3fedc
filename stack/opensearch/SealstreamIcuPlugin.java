/*
 * ICU analysis for Sealstream's local OpenSearch, under the names of OpenSearch's official
 * analysis-icu plugin, so one index mapping (schemas/opensearch/messages.json) serves both.
 *
 * The official plugin is not published to Maven Central, Lucene's ICU module is
 * (org.apache.lucene:lucene-analysis-icu, the same Lucene version as the node's): this class
 * registers that module's components the way the official plugin does, with the same parameters:
 *
 *   tokenizer    icu_tokenizer   ICUTokenizer, default config (CJK and Myanmar by dictionary);
 *                                `rule_files` (custom break rules) is not supported here.
 *   token filter icu_normalizer  ICUNormalizer2Filter; `name` (nfc | nfkc | nfkc_cf, default
 *                                nfkc_cf), `unicode_set_filter`. Like the official token filter,
 *                                composing mode only (its `mode` belongs to the char filter).
 *   token filter icu_folding     ICUFoldingFilter (UTR #30 foldings); `unicode_set_filter`.
 *   char filter  icu_normalizer  ICUNormalizer2CharFilter; `name`, `mode` (compose | decompose,
 *                                default compose), `unicode_set_filter`.
 *
 * Loaded from the classpath by SealstreamNode (see PLUGINS there); compiled by
 * sealstream/stack/opensearch.py together with it.
 */

import java.io.Reader;
import java.util.Map;

import com.ibm.icu.text.FilteredNormalizer2;
import com.ibm.icu.text.Normalizer2;
import com.ibm.icu.text.UnicodeSet;
import org.apache.lucene.analysis.TokenStream;
import org.apache.lucene.analysis.Tokenizer;
import org.apache.lucene.analysis.icu.ICUFoldingFilter;
import org.apache.lucene.analysis.icu.ICUNormalizer2CharFilter;
import org.apache.lucene.analysis.icu.ICUNormalizer2Filter;
import org.apache.lucene.analysis.icu.segmentation.ICUTokenizer;
import org.opensearch.common.settings.Settings;
import org.opensearch.index.IndexSettings;
import org.opensearch.index.analysis.AbstractCharFilterFactory;
import org.opensearch.index.analysis.AbstractTokenFilterFactory;
import org.opensearch.index.analysis.AbstractTokenizerFactory;
import org.opensearch.index.analysis.CharFilterFactory;
import org.opensearch.index.analysis.NormalizingCharFilterFactory;
import org.opensearch.index.analysis.NormalizingTokenFilterFactory;
import org.opensearch.index.analysis.TokenFilterFactory;
import org.opensearch.index.analysis.TokenizerFactory;
import org.opensearch.indices.analysis.AnalysisModule.AnalysisProvider;
import org.opensearch.plugins.AnalysisPlugin;
import org.opensearch.plugins.Plugin;

public final class SealstreamIcuPlugin extends Plugin implements AnalysisPlugin {

    @Override
    public Map<String, AnalysisProvider<TokenizerFactory>> getTokenizers() {
        return Map.of("icu_tokenizer", (index, env, name, settings) -> new IcuTokenizer(index, settings, name));
    }

    @Override
    public Map<String, AnalysisProvider<TokenFilterFactory>> getTokenFilters() {
        return Map.of(
            "icu_normalizer", (index, env, name, settings) -> new IcuNormalizerFilter(index, name, settings),
            "icu_folding", (index, env, name, settings) -> new IcuFoldingFilter(index, name, settings));
    }

    @Override
    public Map<String, AnalysisProvider<CharFilterFactory>> getCharFilters() {
        return Map.of("icu_normalizer", (index, env, name, settings) -> new IcuNormalizerCharFilter(index, name, settings));
    }

    /** `name` (default nfkc_cf) in the given mode, restricted to `unicode_set_filter` if set. */
    static Normalizer2 normalizer(Settings settings, Normalizer2.Mode mode) {
        return restricted(Normalizer2.getInstance(null, settings.get("name", "nfkc_cf"), mode), settings);
    }

    /** The official plugin's `unicode_set_filter`: only characters of this set are normalised. */
    static Normalizer2 restricted(Normalizer2 normalizer, Settings settings) {
        String filter = settings.get("unicode_set_filter");
        if (filter == null) {
            return normalizer;
        }
        UnicodeSet set = new UnicodeSet(filter);
        set.freeze();
        return new FilteredNormalizer2(normalizer, set);
    }

    static final class IcuTokenizer extends AbstractTokenizerFactory {
        IcuTokenizer(IndexSettings index, Settings settings, String name) {
            super(index, settings, name);
            if (!settings.getAsList("rule_files").isEmpty()) {
                throw new IllegalArgumentException(
                    "icu_tokenizer [" + name + "]: rule_files is not supported by the local stack's ICU plugin");
            }
        }

        @Override
        public Tokenizer create() {
            return new ICUTokenizer();
        }
    }

    static final class IcuNormalizerFilter extends AbstractTokenFilterFactory implements NormalizingTokenFilterFactory {
        private final Normalizer2 normalizer;

        IcuNormalizerFilter(IndexSettings index, String name, Settings settings) {
            super(index, name, settings);
            this.normalizer = normalizer(settings, Normalizer2.Mode.COMPOSE);
        }

        @Override
        public TokenStream create(TokenStream stream) {
            return new ICUNormalizer2Filter(stream, normalizer);
        }
    }

    static final class IcuFoldingFilter extends AbstractTokenFilterFactory implements NormalizingTokenFilterFactory {
        private final Normalizer2 normalizer;

        IcuFoldingFilter(IndexSettings index, String name, Settings settings) {
            super(index, name, settings);
            this.normalizer = restricted(ICUFoldingFilter.NORMALIZER, settings);
        }

        @Override
        public TokenStream create(TokenStream stream) {
            return new ICUNormalizer2Filter(stream, normalizer);
        }
    }

    static final class IcuNormalizerCharFilter extends AbstractCharFilterFactory implements NormalizingCharFilterFactory {
        private final Normalizer2 normalizer;

        IcuNormalizerCharFilter(IndexSettings index, String name, Settings settings) {
            super(index, name);
            Normalizer2.Mode mode =
                "decompose".equals(settings.get("mode")) ? Normalizer2.Mode.DECOMPOSE : Normalizer2.Mode.COMPOSE;
            this.normalizer = normalizer(settings, mode);
        }

        @Override
        public Reader create(Reader reader) {
            return new ICUNormalizer2CharFilter(reader, normalizer);
        }
    }
}
