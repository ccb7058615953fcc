# frozen_string_literal: true

require "json"

module Microsandbox
  # Progress of one layer during a pull.
  #
  # It also reads as the reference gem's progress Hash: `ev["kind"]` is
  # "layer_download_progress", `ev["digest"]`, `ev["downloaded_bytes"]`, `ev["total_bytes"]`
  # (and `#to_h` with String keys gives that Hash). This gem reports download progress only:
  # the reference's "resolving", "layer_materialize_*", "stitch_*" and "complete" events
  # do not occur.
  PullProgress = Struct.new(:digest, :done, :total, keyword_init: true) do
    # @return [Float] fraction done, 0.0..1.0
    def fraction
      total.to_i.positive? ? done.to_f / total : 0.0
    end

    # @return [String] "layer_download_progress"
    def kind = "layer_download_progress"

    # A member (`:digest`, `:done`, `:total`, or their String names, as any Struct) or a
    # key of the reference gem's Hash: "kind", "digest", "downloaded_bytes", "total_bytes".
    # @param key [String, Symbol, Integer]
    def [](key)
      case key
      when "kind" then kind
      when "downloaded_bytes" then done
      when "total_bytes" then total
      else super
      end
    end

    # @return [Hash{String=>Object}] the reference gem's event Hash
    def to_event
      { "kind" => kind, "digest" => digest, "downloaded_bytes" => done, "total_bytes" => total }
    end
  end

  # A running image pull. Iterate it for {PullProgress} events; {#wait} returns the
  # resolved reference and manifest digest. From {Sandbox.create_with_progress},
  # {#sandbox} then boots the sandbox.
  class PullSession
    include Enumerable

    # @api private
    # @param native [Native::PullSession, nil] nil when nothing is pulled (a local root)
    # @param create [Proc, nil] boots the sandbox once the pull is done ({#sandbox})
    def initialize(native, create: nil)
      @native = native
      @result = native ? nil : {}
      @create = create
      @sandbox = nil
    end

    # The sandbox of {Sandbox.create_with_progress}: waits for the pull (drains the
    # remaining progress), boots the sandbox and returns it; later calls return the same
    # one. The caller owns it: stop it when done.
    # @return [Sandbox]
    # @raise [ArgumentError] for a session from {Image.start_pull} (no sandbox to boot)
    # @raise [Error] what the pull or {Sandbox.create} raises
    def sandbox
      raise ArgumentError, "this PullSession comes from Image.start_pull: it pulls an image, no sandbox" unless @create

      @sandbox ||= begin
        wait
        @create.call
      end
    end

    # Yields progress events until the pull finishes.
    # @yieldparam progress [PullProgress]
    # @return [self]
    def each
      return enum_for(:each) unless block_given?

      until @result
        a, b, c = @native.next_event
        if a == :done
          @result = JSON.parse(b, symbolize_names: true)
        else
          yield PullProgress.new(digest: a, done: b, total: c)
        end
      end
      self
    end

    # Waits for the pull to finish.
    # @return [Hash{Symbol=>String}] :reference and :manifest_digest
    def wait
      each { |_| nil }
      @result
    end
  end

  # A stored image as listed by {Image.list}.
  class ImageInfo
    # @return [String] canonical reference, e.g. "registry.local:5000/team/app:1.0"
    attr_reader :reference
    # @return [String] "sha256:…"
    attr_reader :manifest_digest
    # @return [String] e.g. "linux/amd64"
    attr_reader :platform
    # @return [Time]
    attr_reader :pulled_at
    # @return [Integer] compressed bytes of config and layers
    attr_reader :content_bytes
    # @return [Integer] host bytes of the prepared root disk
    attr_reader :root_disk_bytes
    # @return [Array<String>] sandboxes whose root is backed by this image
    attr_reader :in_use_by
    # @return [Integer, nil] compressed bytes of config and layers as the manifest lists
    #   them ({#content_bytes}); nil when the manifest is not in the store
    attr_reader :size_bytes
    # @return [String, nil] CPU architecture the image was built for, e.g. "amd64" (from
    #   its config, else the platform it was pulled for)
    attr_reader :architecture
    # @return [String, nil] e.g. "linux" (as {#architecture})
    attr_reader :os
    # @return [Integer] layers in the manifest (0 when the manifest is not in the store)
    attr_reader :layer_count
    # @return [Time] when this reference first entered the local store (a later pull of
    #   it keeps the time; {#pulled_at} is the latest pull). The image's build time is
    #   not this: see `Image.inspect(ref).config`
    attr_reader :created_at
    # @return [Time, nil] when {Sandbox.create} last booted a sandbox from this
    #   reference; nil when it never did
    attr_reader :last_used_at

    # @api private
    def initialize(h)
      @reference = h["reference"]
      @manifest_digest = h["manifest_digest"]
      @platform = h["platform"]
      @pulled_at = Time.at(h["pulled_at"].to_i)
      @content_bytes = h["content_bytes"].to_i
      @root_disk_bytes = h["root_disk_bytes"].to_i
      @in_use_by = h["in_use_by"] || []
      @size_bytes = h["size_bytes"]
      @architecture = h["architecture"]
      @os = h["os"]
      @layer_count = h["layer_count"].to_i
      @created_at = ms_time(h["created_at_ms"]) || @pulled_at
      @last_used_at = ms_time(h["last_used_at_ms"])
    end

    # @return [String]
    def inspect
      "#<#{self.class.name} #{reference} #{manifest_digest[0, 19]}>"
    end

    private

    def ms_time(ms)
      ms.is_a?(Integer) ? Time.at(ms / 1000, ms % 1000, :millisecond) : nil
    end
  end

  # Details of a stored image: {ImageInfo} plus its config and layers. It is an
  # {ImageInfo} itself; {#handle} gives the plain one, as the reference gem does.
  class ImageDetail < ImageInfo
    # @return [Hash{String=>Object}] env, entrypoint, cmd, working_dir, user, labels, …
    attr_reader :config
    # @return [Array<Hash{String=>Object}>] layer descriptors (mediaType, digest, size)
    attr_reader :layers
    # @return [String]
    attr_reader :config_digest

    # @api private
    def initialize(h)
      @summary = h.fetch("summary")
      super(@summary)
      @config = h["config"]
      @layers = h["layers"]
      @config_digest = h["config_digest"]
    end

    # The image's {ImageInfo} (the reference gem's name for it; this detail is one too).
    # @return [ImageInfo]
    def handle
      @handle ||= ImageInfo.new(@summary)
    end
  end

  # Result of {Image.prune}: what was deleted (the counter names are the reference gem's).
  #
  # - `image_refs_removed`: stored references that could boot nothing (an unreadable
  #   record, or one whose manifest is gone; a pull fetches it again)
  # - `manifests_removed`: unreferenced metadata blobs (manifests, indexes, image configs)
  # - `layers_removed`: unreferenced layer blobs
  # - `fsmeta_removed`: root disks (the filesystem built from an image's layers) that no
  #   stored image and no sandbox needs
  # - `vmdk_removed`: always 0; this store builds no VMDK descriptors (an image's disk is
  #   its root disk, counted in `fsmeta_removed`)
  # - `bytes_reclaimed`: host bytes freed by all of it, unused warm-start templates and
  #   leftovers of interrupted pulls
  ImagePruneReport = Struct.new(:image_refs_removed, :manifests_removed, :layers_removed, :fsmeta_removed,
                                :vmdk_removed, :bytes_reclaimed, keyword_init: true)

  # The local OCI image store (`<home>/images`): content-addressed blobs shared between
  # images and one prepared read-only root disk per image. A class with class methods
  # only, as in the reference gem.
  class Image
    REGISTRY_OPTIONS = %i[pull_policy registry_auth registry_insecure registry_ca_certs].freeze

    class << self
      # Pulls an image (if `pull_policy` requires it) and prepares its root disk.
      # With a block, yields {PullProgress} per layer as bytes arrive.
      # @param reference [String] e.g. "alpine", "registry.local:5000/app:1", "app@sha256:…"
      # @param pull_policy [String, Symbol] "always", "if_missing" (default; also spelled
      #   "if-missing") or "never"
      # @param registry_auth [Hash, nil] `{ username:, password: }` (String or Symbol keys;
      #   a missing key is ArgumentError, a non-String value TypeError)
      # @param registry_insecure [Boolean] plain HTTP
      # @param registry_ca_certs [String, Array<String>, nil] extra trusted CA certificates (PEM)
      # @yieldparam progress [PullProgress]
      # @return [Hash{Symbol=>String}] :reference and :manifest_digest
      # @raise [ImageNotFoundError, RegistryError, RegistryAuthError, PlatformNotFoundError]
      def pull(reference, **options, &block)
        payload = { reference: reference, pull_policy: options[:pull_policy]&.to_s }
        Instrumentation.instrument("pull.microsandbox", payload) do |p|
          session = start_pull(reference, **options)
          block ? session.each(&block) : session.each { |_| nil }
          session.wait.tap { |result| p&.store(:manifest_digest, result[:manifest_digest]) }
        end
      end

      # Starts a pull and returns its {PullSession} at once.
      # @return [PullSession]
      def start_pull(reference, **options)
        Validate.utf8_string!("reference", reference)
        opts = registry_options(**options)
        PullSession.new(Native::PullSession.start(Microsandbox.home, reference, Validate.json!(opts)))
      end

      # @return [Array<ImageInfo>] every stored image
      def list
        JSON.parse(Native.image_list_json(Microsandbox.home)).map { |h| ImageInfo.new(h) }
      end

      # @param reference [String]
      # @return [ImageInfo]
      # @raise [ImageNotFoundError]
      def get(reference)
        inspect(reference)
      end

      # @param reference [String]
      # @return [ImageDetail] config and layers of a stored image
      # @raise [ImageNotFoundError]
      def inspect(reference = nil)
        return super() if reference.nil?

        ImageDetail.new(JSON.parse(Native.image_inspect_json(Microsandbox.home, Validate.utf8_string!("reference", reference))))
      end

      # Removes a stored image. Refuses while a sandbox's root is backed by it, unless `force`.
      # @param reference [String]
      # @param force [Boolean]
      # @return [nil]
      def remove(reference, force: false)
        Native.image_remove(Microsandbox.home, Validate.utf8_string!("reference", reference), force ? true : false)
        nil
      end

      # Deletes stored references that can boot nothing, then the blobs and root disks
      # no stored image references (those a sandbox is built on stay), unused warm-start
      # templates and leftovers of interrupted pulls.
      # @return [ImagePruneReport] the counts of what was deleted and the bytes freed
      def prune
        counts = JSON.parse(Native.image_prune(Microsandbox.home))
        ImagePruneReport.new(**ImagePruneReport.members.to_h { |m| [m, counts.fetch(m.to_s)] })
      end

      # Registry options as the engine expects them.
      # @api private
      def registry_options(pull_policy: nil, registry_auth: nil, registry_insecure: false, registry_ca_certs: nil)
        opts = {}
        opts["pull_policy"] = pull_policy.to_s if pull_policy
        if registry_auth
          raise TypeError, "registry_auth must be a Hash with :username and :password" unless registry_auth.is_a?(Hash)

          auth = registry_auth.transform_keys(&:to_sym)
          missing = %i[username password].reject { |k| auth.key?(k) }
          raise ArgumentError, "registry_auth is missing #{missing.map(&:inspect).join(' and ')}" unless missing.empty?

          opts["registry_auth"] = {
            "username" => Validate.string!("registry_auth[:username]", auth[:username]),
            "password" => Validate.string!("registry_auth[:password]", auth[:password])
          }
        end
        opts["registry_insecure"] = registry_insecure ? true : false
        certs = Array(registry_ca_certs)
        certs.each_with_index { |c, i| Validate.string!("registry_ca_certs[#{i}]", c) }
        opts["registry_ca_certs"] = certs unless certs.empty?
        opts
      end
    end
  end
end
