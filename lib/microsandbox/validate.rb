# frozen_string_literal: true

require "json"

module Microsandbox
  # Type checks done in Ruby before anything reaches native code: wrong types raise
  # TypeError naming the expected type; values are checked again by the engine.
  # @api private
  module Validate
    module_function

    def string!(name, value)
      return value if value.is_a?(String)

      raise TypeError, "#{name} must be a String (got #{value.class})"
    end

    # Longest sandbox name, in UTF-8 bytes (the reference gem's limit).
    MAX_NAME_BYTES = 128

    # A sandbox name: `to_s` of what was given (so Symbols work), 1-128 bytes of UTF-8
    # without control characters. The engine checks it again and keeps such names out of
    # file paths (see DESIGN.md).
    def name!(value)
      raise TypeError, "name must be a String or Symbol (got nil)" if value.nil?

      name = utf8!("name", value.to_s)
      if name.empty? || name.bytesize > MAX_NAME_BYTES || name.match?(/[[:cntrl:]]/)
        raise InvalidConfigError, "invalid sandbox name #{name.inspect}: use 1-#{MAX_NAME_BYTES} bytes of UTF-8 " \
                                  "without control characters"
      end

      name
    end

    # An absolute guest path without NUL bytes (InvalidConfigError otherwise).
    def guest_path!(name, value)
      string!(name, value)
      raise InvalidConfigError, "#{name} must be an absolute guest path (got #{value.inspect})" unless value.start_with?("/")
      raise InvalidConfigError, "#{name} must not contain NUL bytes" if value.include?("\0")

      utf8!(name, value)
    end

    def optional_string!(name, value)
      value.nil? ? nil : string!(name, value)
    end

    def integer!(name, value)
      return value if value.is_a?(Integer)

      raise TypeError, "#{name} must be an Integer (got #{value.class})"
    end

    # An Integer above zero (sizes); the engine checks the upper bound.
    def positive_integer!(name, value)
      raise InvalidConfigError, "#{name} must be positive (got #{value})" unless integer!(name, value).positive?

      value
    end

    def string_array!(name, value)
      raise TypeError, "#{name} must be an Array of Strings (got #{value.class})" unless value.is_a?(Array)

      value.each_with_index do |v, i|
        raise TypeError, "#{name}[#{i}] must be a String (got #{v.class})" unless v.is_a?(String)
      end
      value
    end

    # Hash of String/Symbol keys to String values → array of [key, value] pairs.
    def env!(name, value)
      return [] if value.nil?
      raise TypeError, "#{name} must be a Hash of String => String (got #{value.class})" unless value.is_a?(Hash)

      value.map do |k, v|
        raise TypeError, "#{name} keys must be Strings or Symbols (got #{k.class})" unless k.is_a?(String) || k.is_a?(Symbol)
        raise TypeError, "#{name}[#{k.inspect}] must be a String (got #{v.class})" unless v.is_a?(String)

        [utf8!(name, k.to_s), utf8!(name, v)]
      end
    end

    # A Hash of `to_s`-able values (create's `env:`/`labels:`), values made Strings as the
    # reference gem does (`{ "N" => 1 }` → `{ "N" => "1" }`); nil stays nil.
    def coerce_values!(name, value)
      return value if value.nil?
      raise TypeError, "#{name} must be a Hash (got #{value.class})" unless value.is_a?(Hash)

      value.transform_values { |v| v.is_a?(String) ? v : v.to_s }
    end

    # `{ "name" => source }` → `{ "name" => base64 source }` (sources are binary-safe).
    def scripts!(name, value)
      raise TypeError, "#{name} must be a Hash of name => source String (got #{value.class})" unless value.is_a?(Hash)

      value.to_h do |k, v|
        raise TypeError, "#{name} keys must be Strings or Symbols (got #{k.class})" unless k.is_a?(String) || k.is_a?(Symbol)
        raise TypeError, "#{name}[#{k.inspect}] must be a String (got #{v.class})" unless v.is_a?(String)

        key = utf8!(name, k.to_s)
        if key.empty? || key.bytesize > 255 || key.include?("/") || key.include?("\0") || %w[. ..].include?(key)
          raise InvalidConfigError, "invalid script name #{key.inspect}: use 1-255 bytes without '/' or NUL, not '.' or '..'"
        end

        [key, [v].pack("m0")]
      end
    end

    # `{ nofile: 256, nproc: [64, 128] }` → [["nofile", 256, 256], ["nproc", 64, 128]].
    def rlimits!(name, value)
      return [] if value.nil?
      raise TypeError, "#{name} must be a Hash of resource => Integer or [soft, hard] (got #{value.class})" unless value.is_a?(Hash)

      value.map do |res, lim|
        soft, hard = lim.is_a?(Array) ? lim : [lim, lim]
        unless soft.is_a?(Integer) && hard.is_a?(Integer) && !soft.negative? && !hard.negative?
          raise TypeError, "#{name}[#{res.inspect}] must be a non-negative Integer or [soft, hard] (got #{lim.inspect})"
        end

        [utf8!(name, res.to_s), soft, hard]
      end
    end

    # A terminal dimension: Integer rows or cols in 1..65535 (the guest's winsize is 16-bit).
    def winsize!(name, value)
      integer!(name, value)
      return value if value.between?(1, 65_535)

      raise InvalidConfigError, "#{name} must be between 1 and 65535 (got #{value})"
    end

    # `tty:`/`rows:`/`cols:` of an exec → nil (pipes) or [rows, cols] (default 24x80).
    def tty!(tty, rows, cols)
      raise TypeError, "tty must be true or false (got #{tty.class})" unless [true, false].include?(tty)
      unless tty
        return nil if rows.nil? && cols.nil?

        raise InvalidConfigError, "rows: and cols: size a terminal; pass tty: true as well"
      end
      [rows.nil? ? 24 : winsize!("rows", rows), cols.nil? ? 80 : winsize!("cols", cols)]
    end

    # Positive number of seconds or nil.
    def timeout!(name, value)
      return nil if value.nil?
      raise TypeError, "#{name} must be a Numeric number of seconds (got #{value.class})" unless value.is_a?(Numeric)
      raise InvalidConfigError, "#{name} must be positive (got #{value})" unless value.positive?

      value.to_f
    end

    # Strings cross to the guest as UTF-8 (JSON); binary data goes through stdin instead.
    # Exec's command and arguments, coerced as the reference gem does: `to_s` of the
    # command and of each argument (Symbols, Integers, Pathnames work), `Array(args)` (nil
    # is none, a lone String one argument). The results must be valid UTF-8; a NUL byte
    # is refused by the engine ({InvalidConfigError}).
    # @return [Array(String, Array<String>)]
    def argv!(cmd, args)
      [utf8!("cmd", cmd.to_s), Array(args).map { |a| utf8!("args", a.to_s) }]
    end

    # Exec's `env:`: keys and values `to_s`, as the reference gem does (`{ N: 1 }` →
    # `[["N", "1"]]`); nil is none. The engine checks the names and sizes.
    # @return [Array<Array(String, String)>]
    def exec_env!(name, value)
      return [] if value.nil?
      raise TypeError, "#{name} must be a Hash (got #{value.class})" unless value.is_a?(Hash)

      value.map { |k, v| [utf8!(name, k.to_s), utf8!(name, v.to_s)] }
    end

    def utf8!(name, value)
      s = value.encoding == Encoding::UTF_8 ? value : value.dup.force_encoding(Encoding::UTF_8)
      return s if s.valid_encoding?

      raise InvalidConfigError, "#{name} must be valid UTF-8 (pass binary data through stdin:)"
    end

    # A String option that crosses to the engine as text: a String of valid UTF-8.
    # @raise [TypeError] not a String
    # @raise [InvalidConfigError] not valid UTF-8
    def utf8_string!(name, value)
      utf8!(name, string!(name, value))
    end

    # nil, or {utf8_string!}.
    def optional_utf8_string!(name, value)
      value.nil? ? nil : utf8_string!(name, value)
    end

    # JSON text of an options Hash for the engine. Every String in it must be valid
    # UTF-8 (JSON is text): one that is not is an {InvalidConfigError} naming the option
    # (e.g. `workdir`, `registry_auth.username`) instead of a JSON::GeneratorError.
    # @param value [Hash, Array]
    # @return [String]
    def json!(value)
      JSON.generate(utf8_tree!(value))
    end

    # `value` itself, once every String (key or value) in it is known to be valid UTF-8.
    # @raise [InvalidConfigError] naming the first option that is not
    def utf8_tree!(value)
      bad = invalid_utf8_key(value, nil)
      raise InvalidConfigError, "#{bad} must be valid UTF-8" if bad

      value
    end

    # Key path of the first String (key or value) in `value` that is not valid UTF-8.
    def invalid_utf8_key(value, path)
      case value
      when String, Symbol
        s = value.to_s
        s = s.dup.force_encoding(Encoding::UTF_8) unless s.encoding == Encoding::UTF_8
        s.valid_encoding? ? nil : (path || "value")
      when Hash
        value.each do |k, v|
          key = k.to_s
          label = path ? "#{path}.#{key}" : key
          return (path || "a key") unless invalid_utf8_key(key, label).nil?

          found = invalid_utf8_key(v, label)
          return found if found
        end
        nil
      when Array
        value.each_with_index do |v, i|
          found = invalid_utf8_key(v, "#{path || 'value'}[#{i}]")
          return found if found
        end
        nil
      end
    end
    private_class_method :invalid_utf8_key
  end
end
