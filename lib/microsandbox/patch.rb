# frozen_string_literal: true

module Microsandbox
  # Changes to a new sandbox's root filesystem, passed as `Sandbox.create(patches: [...])`.
  #
  # As in the reference gem, each factory returns a plain Hash (a frozen {Patch::Spec},
  # a Hash subclass whose `inspect` hides file contents) such as
  # `{"kind" => "text", "path" => "/etc/app.conf", "content" => "...", "replace" => false}`,
  # and hand-built Hashes with String or Symbol keys are accepted too. Kinds and keys:
  #
  #   text / file  path, content, mode (optional), replace (default false)
  #   append       path, content
  #   mkdir        path, mode (optional)
  #   copy_file    src (host path), dst, mode (optional: the host file's), replace
  #   copy_dir     src (host directory), dst, replace
  #   symlink      target, link, replace
  #   remove       path
  #
  # They are applied in order when the guest's root is first mounted, before `create`
  # returns: before any of your commands, the image's main process and the scripts run
  # (the guest agent, PID 1, is the only process then). The sandbox's copy-on-write root
  # keeps them, so {Sandbox.start} does not apply them again. New files and directories
  # belong to root. Without `replace: true`, a `text`/`file`/`copy_file`/`symlink` patch
  # (and each file or symlink a `copy_dir` writes) refuses to shadow a path that already
  # exists there (from the image or an earlier patch); directories are merged into. If a
  # patch fails, `create` raises {PatchFailedError} naming it and leaves nothing behind.
  #
  # @example
  #   Microsandbox::Sandbox.create("app", image: "alpine", patches: [
  #     Microsandbox::Patch.text("/etc/app.conf", "debug = true\n", mode: 0o600),
  #     Microsandbox::Patch.text("/etc/motd", "welcome\n", replace: true),
  #     Microsandbox::Patch.mkdir("/var/app", mode: 0o750),
  #     Microsandbox::Patch.append("/etc/hosts", "10.0.0.5 db\n"),
  #     Microsandbox::Patch.copy_file("config/seed.sql", "/srv/seed.sql"),
  #     Microsandbox::Patch.copy_dir("vendor/app", "/opt/app"),
  #     Microsandbox::Patch.symlink("/opt/app/bin/run", "/usr/local/bin/run"),
  #     Microsandbox::Patch.remove("/etc/issue"),
  #     { "kind" => "file", "path" => "/opt/blob", "content" => "\x00\x01".b }
  #   ])
  module Patch
    # A patch as the factories return it: a frozen Hash with String keys whose `inspect`
    # shows the size of file contents, not the contents (they may be secrets).
    class Spec < Hash
      # @return [String]
      def inspect
        shown = map do |k, v|
          val = if k == "content" then "<#{v.bytesize} bytes>"
                elsif k == "mode" && v.is_a?(Integer) then format("0o%o", v)
                else v.inspect
                end
          "#{k.inspect}=>#{val}"
        end
        "{#{shown.join(', ')}}"
      end
      alias to_s inspect
    end

    # Required and optional keys of each kind.
    KINDS = {
      "text" => [%w[path content], %w[mode replace]],
      "file" => [%w[path content], %w[mode replace]],
      "append" => [%w[path content], []],
      "mkdir" => [%w[path], %w[mode]],
      "copy_file" => [%w[src dst], %w[mode replace]],
      "copy_dir" => [%w[src dst], %w[replace]],
      "symlink" => [%w[target link], %w[replace]],
      "remove" => [%w[path], []]
    }.freeze

    class << self
      # A file holding `content` (binary-safe; missing parent directories are created).
      # @param path [String] absolute guest path
      # @param content [String]
      # @param mode [Integer, nil] permission bits (nil: 0o644, exact: no umask)
      # @param replace [Boolean] allow replacing a path that already exists
      # @return [Spec]
      # @raise [InvalidConfigError, TypeError] a bad path, content or mode
      def text(path, content, mode: nil, replace: false)
        build("kind" => "text", "path" => path, "content" => content, "mode" => mode, "replace" => replace)
      end

      # {text} for binary content (the reference gem's name; both are binary-safe here).
      # @return [Spec]
      def file(path, content, mode: nil, replace: false)
        build("kind" => "file", "path" => path, "content" => content, "mode" => mode, "replace" => replace)
      end

      # A directory, with its missing parents (like `mkdir -p`; an existing directory is
      # fine and gets the mode). Fails when a file is in the way.
      # @param path [String] absolute guest path
      # @param mode [Integer, nil] permission bits of the directory (nil: 0o755)
      # @return [Spec]
      def mkdir(path, mode: nil)
        build("kind" => "mkdir", "path" => path, "mode" => mode)
      end

      # Appends `content` to an existing file (fails when the file is missing).
      # @param path [String] absolute guest path
      # @param content [String]
      # @return [Spec]
      def append(path, content)
        build("kind" => "append", "path" => path, "content" => content)
      end

      # Copies a host file to `dst` (missing parent directories are created). The host
      # file must exist when `create` runs; it is read then, streaming.
      # @param src [String, Pathname] host path (relative to the current directory)
      # @param dst [String] absolute guest path
      # @param mode [Integer, nil] permission bits (nil: the host file's)
      # @param replace [Boolean]
      # @return [Spec]
      def copy_file(src, dst, mode: nil, replace: false)
        build("kind" => "copy_file", "src" => src, "dst" => dst, "mode" => mode, "replace" => replace)
      end

      # Copies a host directory's contents into the guest directory `dst` (created, or
      # merged into): directories, regular files and symlinks, with their permission bits.
      # Other file types fail the patch.
      # @param src [String, Pathname] host directory
      # @param dst [String] absolute guest path
      # @param replace [Boolean] allow its files and symlinks to replace existing ones
      # @return [Spec]
      def copy_dir(src, dst, replace: false)
        build("kind" => "copy_dir", "src" => src, "dst" => dst, "replace" => replace)
      end

      # A symlink at `link` pointing at `target` (a directory at `link` is never replaced).
      # @param target [String] what the link points at (may be relative)
      # @param link [String] absolute guest path of the link
      # @param replace [Boolean] allow replacing a file or symlink at `link`
      # @return [Spec]
      def symlink(target, link, replace: false)
        build("kind" => "symlink", "target" => target, "link" => link, "replace" => replace)
      end

      # Removes a path and everything under it (like `rm -rf`; a missing path is fine).
      # @param path [String] absolute guest path
      # @return [Spec]
      def remove(path)
        build("kind" => "remove", "path" => path)
      end

      # Checks a `patches:` option and returns the engine's form of each patch.
      # @api private
      # @return [Array<Hash{String=>Object}>]
      # @raise [ArgumentError] not an Array of Hashes, an unknown kind, missing or unknown keys
      def to_config_list!(patches)
        raise ArgumentError, "patches must be an Array of patch Hashes (got #{patches.class})" unless patches.is_a?(Array)

        patches.each_with_index.map do |p, i|
          raise ArgumentError, "patches[#{i}] must be a Hash such as Microsandbox::Patch.text returns (got #{p.class})" unless p.is_a?(Hash)

          to_config(check(p.to_h { |k, v| [k.to_s, v] }, "patches[#{i}]"))
        end
      end

      private

      # Validates `fields` (nil values mean "not given") into a frozen Spec.
      def build(fields)
        spec = Spec.new
        check(fields.compact, "patch").each { |k, v| spec[k] = v }
        spec.freeze
      end

      # Checks keys and values; returns the normalized fields (String keys, no nils).
      def check(fields, where)
        kind = fields["kind"].to_s
        required, optional = KINDS[kind] || raise(ArgumentError, "#{where}: unknown kind #{fields['kind'].inspect} (one of #{KINDS.keys.join(', ')})")
        fields = fields.compact
        missing = required - fields.keys
        raise ArgumentError, "#{where} (#{kind}): missing #{missing.join(', ')}" unless missing.empty?

        unknown = fields.keys - required - optional - ["kind"]
        raise ArgumentError, "#{where} (#{kind}): unknown key #{unknown.join(', ')}" unless unknown.empty?

        fields.to_h do |k, v|
          [k, case k
              when "kind" then kind
              when "path", "dst", "link" then guest(v)
              when "content" then Validate.string!("content", v).b.freeze
              when "mode" then mode!(v)
              when "replace" then v ? true : false
              when "src" then host(v)
              when "target" then target!(v)
              end]
        end
      end

      # The engine's JSON form: "file" is a text patch there, contents are base64.
      def to_config(fields)
        h = {}
        fields.each { |k, v| h[k] = k == "content" ? [v].pack("m0") : v }
        h["kind"] = "text" if h["kind"] == "file"
        h
      end

      def guest(path)
        path = path.to_path if path.respond_to?(:to_path)
        Validate.guest_path!("path", path).dup.freeze
      end

      def host(src)
        src = src.to_path if src.respond_to?(:to_path)
        File.expand_path(Validate.utf8!("source", Validate.string!("source", src))).freeze
      end

      def target!(target)
        target = Validate.utf8!("target", Validate.string!("target", target))
        raise InvalidConfigError, "symlink target must not be empty or contain NUL bytes" if target.empty? || target.include?("\0")

        target.dup.freeze
      end

      def mode!(mode)
        Validate.integer!("mode", mode)
        raise InvalidConfigError, format("mode must be between 0 and 0o7777 (got 0o%o)", mode) unless mode.between?(0, 0o7777)

        mode
      end
    end
  end
end
